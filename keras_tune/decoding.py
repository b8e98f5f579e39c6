"""Decoding: Gemma's chat turn format, samplers, and `generate_texts` (library code).

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

from keras_tune.errors import UserError

# Gemma's turn markers. A conversation renders as
# <start_of_turn>user\n{text}<end_of_turn>\n<start_of_turn>model\n{text}<end_of_turn>\n...
USER_TURN, MODEL_TURN, END_OF_TURN = "<start_of_turn>user\n", "<start_of_turn>model\n", "<end_of_turn>\n"
SAMPLERS = ("greedy", "top_k", "top_p")


def chat_prompt(prompt):
    """Wraps a user prompt in Gemma's chat turn format, ending where the model's turn starts.

    Args:
        prompt: the user's text.
    """
    return USER_TURN + prompt + END_OF_TURN + MODEL_TURN


def stop_token_ids(tokenizer, chat):
    """`<eos>`, plus `<end_of_turn>` for chat prompts when the vocabulary has it.

    Args:
        tokenizer: a keras-hub Gemma tokenizer.
        chat: whether prompts are in the chat format.
    """
    ids = [int(tokenizer.end_token_id)]
    if chat:
        try:
            turn = tokenizer.token_to_id("<end_of_turn>")
        except (KeyError, ValueError):
            turn = None
        if turn is not None and int(turn) not in ids:
            ids.append(int(turn))
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
        chat: wrap each prompt in the Gemma chat turn format and stop at `<end_of_turn>`.
    """
    inputs = [chat_prompt(p) if chat else p for p in prompts]
    # The batch is split over the mesh's batch axis: pad it to a multiple with copies, drop them after.
    multiple = _batch_axis_size()
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


def _batch_axis_size():
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
