"""Decoding: the chat turn formats (Gemma's, Gemma 4's), samplers, and `generate_texts` (library code).

Library code shared by the `generate` tool, the samples `fit` writes during
training, and the `chat` data recipe (which renders training conversations in
the same turn format the model is prompted with here).

Example:

```python
from keras_tune import decoding
causal_lm.compile(sampler=decoding.make_sampler("top_p", temperature=0.8, seed=1))
texts = decoding.generate_texts(causal_lm, causal_lm.preprocessor, ["def fib(n):"], max_length=64)
```
"""

import dataclasses

from keras_tune.errors import UserError

# Gemma's turn markers. A conversation renders as
# <start_of_turn>user\n{text}<end_of_turn>\n<start_of_turn>model\n{text}<end_of_turn>\n...
USER_TURN, MODEL_TURN, END_OF_TURN = "<start_of_turn>user\n", "<start_of_turn>model\n", "<end_of_turn>\n"
SAMPLERS = ("greedy", "top_k", "top_p")


@dataclasses.dataclass(frozen=True)
class TurnFormat:
    """A chat turn format: the markers that open a user, model (and system) turn and close any turn.

    Attributes:
        user, model: what opens a user or model turn.
        end: what closes a turn.
        system: what opens a system turn; "" when the format has none (system
            text then leads the next user turn, separated by a blank line).
        end_token: the piece that ends a model turn (a stop token).
    """

    user: str
    model: str
    end: str
    system: str
    end_token: str


GEMMA_TURNS = TurnFormat(USER_TURN, MODEL_TURN, END_OF_TURN, "", "<end_of_turn>")
# Gemma 4's: <|turn>user\n{text}<turn|>\n<|turn>model\n{text}<turn|>\n, with a system turn of its own.
GEMMA4_TURNS = TurnFormat("<|turn>user\n", "<|turn>model\n", "<turn|>\n", "<|turn>system\n", "<turn|>")
GEMMA4_TURN_OPEN = "<|turn>"


def _single_piece(tokenizer, piece):
    """Whether `piece` is one token of the tokenizer's vocabulary (keras-hub maps unknown pieces to `<unk>`)."""
    try:
        return tokenizer.id_to_token(int(tokenizer.token_to_id(piece))) == piece
    except (KeyError, ValueError, TypeError, AttributeError):
        return False


def turn_format(tokenizer=None):
    """The turn format a tokenizer speaks: Gemma 4's when `<|turn>` is one piece of its vocabulary, else Gemma's.

    Args:
        tokenizer: a keras-hub tokenizer (None: Gemma's format).
    """
    if tokenizer is not None and _single_piece(tokenizer, GEMMA4_TURN_OPEN):
        return GEMMA4_TURNS
    return GEMMA_TURNS


def chat_prompt(prompt, tokenizer=None):
    """Wraps a user prompt in the chat turn format, ending where the model's turn starts.

    Args:
        prompt: the user's text.
        tokenizer: the model's tokenizer, whose vocabulary says the format (`turn_format`; None: Gemma's).
    """
    turns = turn_format(tokenizer)
    return turns.user + prompt + turns.end + turns.model


def conversation_prompt(turns, tokenizer=None):
    """A whole conversation in the chat turn format, ending where the model's next turn starts.

    Gemma has no system turn: system text leads the next user turn, separated by
    a blank line, as Gemma's chat template (and the `chat` data recipe) put it;
    Gemma 4 has one.

    Args:
        turns: `(role, text)` pairs, role "system", "user" or "model"; the last is the user's.
        tokenizer: the model's tokenizer, whose vocabulary says the format (`turn_format`; None: Gemma's).
    """
    markers = turn_format(tokenizer)
    parts, system = [], []
    for role, text in turns:
        if role == "system" and markers.system:
            parts.append(markers.system + text + markers.end)
        elif role == "system":
            system.append(text)
        elif role == "user":
            parts.append(markers.user + "\n\n".join(system + [text]) + markers.end)
            system = []
        else:
            parts.append(markers.model + text + markers.end)
    return "".join(parts) + markers.model


def stop_token_ids(tokenizer, chat):
    """`<eos>`, plus the end-of-turn piece for chat prompts (`<end_of_turn>`, Gemma 4's `<turn|>`) when the vocabulary has it.

    Args:
        tokenizer: a keras-hub Gemma tokenizer.
        chat: whether prompts are in the chat format.
    """
    ids = [int(tokenizer.end_token_id)]
    end = turn_format(tokenizer).end_token
    if chat and _single_piece(tokenizer, end) and int(tokenizer.token_to_id(end)) not in ids:
        ids.append(int(tokenizer.token_to_id(end)))
    return tuple(ids)


def generate_texts(causal_lm, preprocessor, prompts, max_length, chat=False):
    """Generates a continuation of each prompt (returned without the prompt).

    Works while `fit` runs with the preprocessor detached: `preprocessor` is
    attached for the call and the previous one put back.

    Args:
        causal_lm: a keras-hub CausalLM (its compiled sampler is used).
        preprocessor: its CausalLM preprocessor.
        prompts: strings.
        max_length: prompt plus generated tokens, at most.
        chat: wrap each prompt in the model's chat turn format and stop at its end-of-turn piece.
    """
    inputs = [chat_prompt(p, preprocessor.tokenizer) if chat else p for p in prompts]
    # The batch is split over the mesh's batch axis: pad it to a multiple with copies, drop them after.
    multiple = batch_axis_size()
    inputs += inputs[-1:] * (-len(inputs) % multiple)
    before = causal_lm.preprocessor
    causal_lm.preprocessor = preprocessor
    try:
        outputs = causal_lm.generate(
            inputs,
            max_length=int(max_length),
            stop_token_ids=stop_token_ids(preprocessor.tokenizer, chat),
            strip_prompt=True,
        )
    finally:
        causal_lm.preprocessor = before
    texts = [outputs] if isinstance(outputs, str) else [str(o) for o in outputs]
    return texts[: len(prompts)]


def batch_axis_size():
    """How many ways the active keras distribution splits a batch (1 without one)."""
    import keras

    distribution = keras.distribution.distribution()
    mesh = getattr(distribution, "device_mesh", None)
    if mesh is None:
        return 1
    name = getattr(distribution, "batch_dim_name", None) or mesh.axis_names[0]
    return int(dict(zip(mesh.axis_names, mesh.shape)).get(name, 1))


def make_sampler(name="greedy", temperature=1.0, top_k=50, top_p=0.9, seed=None):
    """A keras-hub sampler: greedy, top-k or top-p (nucleus), with temperature.

    Args:
        name: "greedy", "top_k" or "top_p".
        temperature: logits are divided by it before sampling (sampled modes).
        top_k: candidates kept by top-k.
        top_p: probability mass kept by top-p.
        seed: makes sampling repeatable.
    """
    import keras_hub

    if name == "greedy":
        return keras_hub.samplers.GreedySampler()
    if temperature <= 0:
        raise UserError(f"--temperature {temperature}: expected a positive number such as 0.7")
    if name == "top_k":
        if top_k < 1:
            raise UserError(f"--top-k {top_k}: expected at least 1")
        return keras_hub.samplers.TopKSampler(k=int(top_k), seed=seed, temperature=float(temperature))
    if name == "top_p":
        if not 0 < top_p <= 1:
            raise UserError(f"--top-p {top_p}: expected a probability in (0, 1]")
        return keras_hub.samplers.TopPSampler(p=float(top_p), seed=seed, temperature=float(temperature))
    raise UserError(f"--sampler '{name}'; expected one of {', '.join(SAMPLERS)}")
