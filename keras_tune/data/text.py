"""Recipe `text`: a user's own local files.

- `.txt`: documents separated by blank lines (a file without blank lines is one
  document). Documents are packed under `batching="auto"`.
- `.jsonl`, `.json` (a list of objects), `.csv`: one example a record. A record
  with the text field (`data.text_field`, default "text") is a document; a
  record with the prompt and response fields (`data.prompt_field`,
  `data.response_field`) is a prompt/target pair: the loss covers the response
  and its `<eos>`, never the prompt (whole pairs packed under `auto`). The first record
  decides which; every record must then have the field(s).

`data.max_examples` caps how many examples are read (0 = all); a seeded
`data.validation_fraction` of them is held out for validation.

Example:

```python
config.data.name, config.data.path = "text", "notes/*.txt"
bundle = make_datasets(config.data, tokenizer, seed=0)
```
"""


from keras_tune.data import files
from keras_tune.data.files import ReadExamples, read_examples, split_source
from keras_tune.errors import UserError

# How a model tuned on this recipe is prompted: in chat turns, or with plain text.
PROMPT_FORMAT = "plain"
SUFFIXES = (".txt", ".jsonl", ".json", ".csv", ".parquet", ".arrow")


def check(data_config):
    """The checks that need no tokenizer (`keras_tune.data.check_data`): `--data-path` names files."""
    files.find_files(data_config.path, SUFFIXES, "text")


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
    read = ReadExamples("text", kind, examples, dropped, f"{len(paths)} file(s) at '{data_config.path}'")
    return split_source(read, data_config, seed, files.read_validation(data_config, SUFFIXES, "text", to_example))
