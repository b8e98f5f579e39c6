"""Recipe `imdb`: IMDb movie reviews (TFDS `imdb_reviews`) as plain text for causal LM.

Labels are dropped; each review is a document (packed under `batching="auto"`,
padded to `seq_len` under `pad`, as in the keras-hub LoRA tutorial, which
trains on 2,000 reviews at sequence length 128). Training reads the `train`
split (the first `data.max_examples`, 0 = all); validation reads the first
`data.max_validation_examples` of the `test` split (0 = all of it).

Example:

```python
config.data.name, config.data.max_examples = "imdb", 2000
bundle = make_datasets(config.data, tokenizer, seed=0)
```
"""

from keras_tune.data.pipeline import Source
from keras_tune.data.tokens import document_example
from keras_tune.data.tfds_source import load_split
from keras_tune.errors import UserError

# How a model tuned on this recipe is prompted: in chat turns, or with plain text.
PROMPT_FORMAT = "plain"
TFDS_NAME = "imdb_reviews"


def check(data_config):
    """The checks that need no tokenizer (`keras_tune.data.check_data`): IMDb reads TFDS, not files."""
    if data_config.path:
        raise UserError(
            f"--data-path '{data_config.path}' with recipe 'imdb', which reads TFDS; "
            "expected --data-dir for a TFDS data directory (or recipe 'text' for your files)"
        )


def source(data_config, tokenizer, seed=0, log=print):
    """Returns the `Source` for IMDb reviews."""
    check(data_config)
    train, train_where = load_split(TFDS_NAME, "train", data_config.data_dir, int(data_config.max_examples))
    val, val_where = load_split(TFDS_NAME, "test", data_config.data_dir, int(data_config.max_validation_examples))
    log(f"imdb: {train_where}; validation {val_where}")

    def to_example(features):
        return document_example(features["text"])

    return Source(
        recipe="imdb",
        kind="text",
        train=train.map(to_example),
        train_source=train_where,
        validation=val.map(to_example),
        validation_source=val_where,
    )
