"""Recipe `text`: a user's own local files.

- `.txt`: documents separated by blank lines (a file without blank lines is one
  document). Documents are packed under `batching="auto"`.
- `.jsonl`, `.json` (a list of objects), `.csv`: one example a record. A record
  with the text field (`data.text_field`, default "text") is a document; a
  record with the prompt and response fields (`data.prompt_field`,
  `data.response_field`) is a prompt/target pair: the loss covers the response
  and its `<eos>`, never the prompt (bucketed under `auto`). The first record
  decides which; every record must then have the field(s).

`data.max_examples` caps how many examples are read (0 = all); a seeded
`data.validation_fraction` of them is held out for validation.

Example:

```python
config.data.name, config.data.path = "text", "notes/*.txt"
bundle = make_datasets(config.data, tokenizer, seed=0)
```
"""

import re
from collections import Counter

from keras_tune.data import files
from keras_tune.data.pipeline import Source, examples_dataset
from keras_tune.errors import UserError

SUFFIXES = (".txt", ".jsonl", ".json", ".csv")
_BLANK_LINE = re.compile(r"\n[ \t]*\n")


def paragraphs(text):
    """Returns the blank-line-separated documents of `text` (empty ones left out)."""
    return [p for p in _BLANK_LINE.split(text.strip("\n")) if p.strip()]


def read_examples(paths, data_config, recipe, to_record_example, txt_ok=True):
    """Reads examples from local files until `max_examples` (0 = all).

    Args:
        paths: files from `files.find_files`.
        data_config: the `data` config section.
        recipe: the recipe's name, for messages.
        to_record_example: `(record, where) -> (segments, weights) | str` for a
            JSONL/JSON/CSV record; a string is a reason to drop the record.
        txt_ok: whether `.txt` files are documents for this recipe.

    Returns:
        (examples, dropped): examples as `(segments, weights)`, and reason -> count.
    """
    limit = int(data_config.max_examples)
    examples, dropped = [], Counter()
    for path in paths:
        before = len(examples) + sum(dropped.values())
        if path.suffix == ".txt":
            if not txt_ok:
                raise UserError(f"{path}: recipe '{recipe}' reads .jsonl, .json or .csv records, not .txt")
            for document in paragraphs(files.read_text(path)):
                examples.append(([document], [1.0]))
                if limit and len(examples) >= limit:
                    return examples, dropped
        else:
            for where, record in files.iter_records(path):
                example = to_record_example(record, where)
                if isinstance(example, str):
                    dropped[example] += 1
                else:
                    examples.append(example)
                if limit and len(examples) >= limit:
                    return examples, dropped
        if len(examples) + sum(dropped.values()) == before:
            if len(paths) == 1:
                raise files.empty_file_error(path, recipe)
            dropped["empty file"] += 1
    if not examples and not dropped:
        raise UserError(f"--data-path '{data_config.path}': all {len(paths)} files are empty; expected text")
    return examples, dropped


def split_source(recipe, kind, examples, dropped, data_config, seed, where, notes=()):
    """Holds out a seeded validation share of `examples` and returns a `Source`."""
    train_index, val_index = files.hold_out(len(examples), data_config, seed)
    train = [examples[i] for i in train_index]
    validation = [examples[i] for i in val_index]
    source = Source(
        recipe=recipe,
        kind=kind,
        train=examples_dataset(train),
        train_source=f"{where}: {len(train)} of {len(examples)} examples",
        train_dropped=Counter(dropped),
        notes=list(notes),
    )
    if validation:
        source.validation = examples_dataset(validation)
        source.validation_source = f"{where}: {len(validation)} held-out examples (seed {seed})"
    else:
        source.notes.append(f"no validation: {len(examples)} example(s) and validation_fraction "
                            f"{data_config.validation_fraction}")
    return source


def source(data_config, tokenizer, seed=0, log=print):
    """Returns the `Source` for the user's files at `data_config.path`."""
    paths = files.find_files(data_config.path, SUFFIXES, "text")
    text_field = data_config.text_field
    prompt_field, response_field = data_config.prompt_field, data_config.response_field
    mode = {}

    def to_example(record, where):
        if "kind" not in mode:
            if text_field in record:
                mode["kind"] = "text"
            elif prompt_field in record and response_field in record:
                mode["kind"] = "prompt"
            else:
                have = ", ".join(sorted(map(str, record))) or "none"
                raise UserError(
                    f"{where}: no field '{text_field}' and no '{prompt_field}'/'{response_field}' pair "
                    f"(fields: {have}); expected text records or prompt/response records"
                )
        if mode["kind"] == "text":
            text = files.field(record, text_field, where)
            return ([text], [1.0]) if text.strip() else "empty text"
        prompt = files.field(record, prompt_field, where)
        response = files.field(record, response_field, where)
        return ([prompt, response], [0.0, 1.0]) if response.strip() else "empty response"

    has_txt = any(p.suffix == ".txt" for p in paths)
    examples, dropped = read_examples(paths, data_config, "text", to_example)
    if has_txt and mode.get("kind") == "prompt":
        raise UserError(
            f"--data-path '{data_config.path}' mixes .txt documents with prompt/response records; "
            "expected one kind"
        )
    kind = mode.get("kind", "text")
    log(f"text: read {len(examples)} examples from {len(paths)} file(s) ({kind})")
    return split_source("text", kind, examples, dropped, data_config, seed, f"{len(paths)} file(s) at '{data_config.path}'")
