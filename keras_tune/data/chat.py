"""Recipe `chat`: instruction data rendered in the model's turn format, loss on model turns only.

Records come from `.jsonl`, `.json` (a list of objects) or `.csv` files and hold
either a messages list (`data.messages_field`, default "messages": objects with
`role` and `content`) or a prompt and a response (`data.prompt_field`,
`data.response_field`). Each conversation becomes

```
<bos><start_of_turn>user\n{user}<end_of_turn>\n<start_of_turn>model\n{model}<end_of_turn>\n...<eos>
```

with loss on each model turn's text, its `<end_of_turn>\n` and the final
`<eos>`; user turns and the `<start_of_turn>model\n` headers carry none. Roles:
`user`, `model` (or `assistant`), `system` (Gemma has no system turn: its text
leads the next user turn, as Gemma's chat template does). A Gemma 4 tokenizer
(`<|turn>` one piece) gets Gemma 4's format: `<|turn>user\n{user}<turn|>\n<|turn>model\n...`,
with a `<|turn>system\n` turn of its own (`keras_tune.decoding.turn_format`).

Example:

```python
config.data.name, config.data.path = "chat", "conversations.jsonl"
bundle = make_datasets(config.data, tokenizer, seed=0)
```
"""

import numpy as np

from keras_tune.data import files
from keras_tune.data.files import ReadExamples, read_examples, split_source
from keras_tune.errors import UserError
from keras_tune.decoding import GEMMA_TURNS, turn_format

# Gemma's (Gemma 1 to 3) turn markers, under the names callers of this recipe read them by.
USER, MODEL, END = GEMMA_TURNS.user, GEMMA_TURNS.model, GEMMA_TURNS.end

# How a model tuned on this recipe is prompted: in chat turns, or with plain text.
PROMPT_FORMAT = "chat"
SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".arrow")
ROLES = {"user": "user", "human": "user", "model": "model", "assistant": "model", "system": "system"}


def render(turns, markers=GEMMA_TURNS):
    """Returns `(segments, weights)` for a conversation given as `(role, text)` pairs.

    Args:
        turns: `(role, text)` with role "user", "model" or "system".
        markers: the turn format (`keras_tune.decoding.turn_format` of the
            tokenizer: Gemma's, or Gemma 4's `<|turn>` ones with a system turn of its own).
    """
    segments, weights, system = [], [], []
    for role, text in turns:
        if role == "system" and markers.system:
            segments.append(markers.system + text + markers.end)
            weights.append(0.0)
        elif role == "system":
            system.append(text)
        elif role == "user":
            text = "\n\n".join(system + [text])
            system = []
            segments.append(markers.user + text + markers.end)
            weights.append(0.0)
        else:
            segments += [markers.model, text + markers.end]
            weights += [0.0, 1.0]
    return segments, weights


def prompt_overhead(tokenizer):
    """Tokens a one-exchange conversation adds around its texts (with `<bos>`, `<eos>`)."""
    markers = turn_format(tokenizer)
    return int(np.asarray(tokenizer(markers.user + markers.end + markers.model + markers.end)).size) + 2


def check(data_config):
    """The checks that need no tokenizer (`keras_tune.data.check_data`): `--data-path` names record files."""
    files.find_files(data_config.path, SUFFIXES, "chat")


def source(data_config, tokenizer, seed=0, log=print):
    """Returns the `Source` for the conversations at `data_config.path`."""
    seq_len = int(data_config.seq_len)
    overhead = prompt_overhead(tokenizer) if tokenizer is not None else 0  # None: raw texts, no rows to fit
    if seq_len <= overhead:
        raise UserError(
            f"seq_len {seq_len} is too small for the chat format: its turn markers alone take "
            f"{overhead} tokens; expected seq_len > {overhead}"
        )
    paths = files.find_files(data_config.path, SUFFIXES, "chat")
    messages_field = data_config.messages_field
    prompt_field, response_field = data_config.prompt_field, data_config.response_field
    markers = turn_format(tokenizer)  # Gemma 4's tokenizer has its own turn markers

    def to_example(record, where):
        if messages_field in record:
            turns = []
            for i, message in enumerate(files.field(record, messages_field, where, kind="list")):
                at = f"{where} {messages_field}[{i}]"
                if not isinstance(message, dict):
                    raise UserError(f"{at}: a {type(message).__name__}; expected an object with role and content")
                role = files.field(message, "role", at)
                if role not in ROLES:
                    raise UserError(f"{at}: role '{role}'; expected one of {', '.join(ROLES)}")
                turns.append((ROLES[role], files.field(message, "content", at)))
        elif prompt_field in record or response_field in record:
            turns = [("user", files.field(record, prompt_field, where)),
                     ("model", files.field(record, response_field, where))]
        else:
            have = ", ".join(sorted(map(str, record))) or "none"
            raise UserError(
                f"{where}: no field '{messages_field}' and no '{prompt_field}'/'{response_field}' pair "
                f"(fields: {have}); expected a messages list or a prompt and a response"
            )
        if not any(role == "model" and text.strip() for role, text in turns):
            return "no model turn"
        return render(turns, markers)

    examples, dropped = read_examples(paths, data_config, "chat", to_example, txt_ok=False)
    log(f"chat: read {len(examples)} conversations from {len(paths)} file(s)")
    read = ReadExamples("chat", "prompt", examples, dropped, f"{len(paths)} file(s) at '{data_config.path}'")
    validation = files.read_validation(data_config, SUFFIXES, "chat", to_example, txt_ok=False)
    return split_source(read, data_config, seed, validation)
