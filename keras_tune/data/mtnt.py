"""Recipe `mtnt`: MTNT translation pairs (TFDS `mtnt/<pair>`) as prompt + target.

Each pair becomes `<bos>` + the prompt template filled with the source (default
`"Translate this into French:\\n{source}\\n"`) followed by the target + `<eos>`;
the loss covers only the target and its `<eos>`, never the prompt or padding,
as the Gemma translation tutorials do. Under `batching="auto"` whole pairs
share rows (packed, each attending only to itself), or, where that would not
fill a batch, each has a row of a few bucket lengths. Training reads `train` (the first `data.max_examples`, 0 =
all), validation the first `data.max_validation_examples` of `valid`.

Example:

```python
config.data.name, config.data.mtnt_pair = "mtnt", "en-fr"
bundle = make_datasets(config.data, tokenizer, seed=0)
```
"""

import numpy as np

from keras_tune.data.pipeline import Source
from keras_tune.data.tfds_source import load_split
from keras_tune.errors import UserError

# How a model tuned on this recipe is prompted: in chat turns, or with plain text.
PROMPT_FORMAT = "plain"
PAIRS = ("en-fr", "en-ja", "fr-en")


def template_parts(template):
    """Splits a prompt template at its one `{source}` into (before, after)."""
    if template.count("{source}") != 1:
        raise UserError(
            f"data.prompt_template {template!r} has {template.count('{source}')} '{{source}}' fields; "
            "expected exactly one"
        )
    before, after = template.split("{source}")
    return before.replace("{{", "{").replace("}}", "}"), after.replace("{{", "{").replace("}}", "}")


def pair_examples(dataset, template, src="src", dst="dst"):
    """Maps a dataset of `{src, dst}` string features to prompt/target examples.

    Args:
        dataset: tf.data.Dataset of dicts with source and target strings.
        template: prompt template with one `{source}`.
        src: the source feature's name.
        dst: the target feature's name.
    """
    import tensorflow as tf

    before, after = template_parts(template)

    def to_example(features):
        prompt = tf.strings.join([before, features[src], after])
        return {"segments": tf.stack([prompt, features[dst]]), "weights": tf.constant([0.0, 1.0])}

    return dataset.map(to_example)


def check_seq_len(template, tokenizer, seq_len):
    """Raises a `UserError` if `seq_len` cannot hold the template, `<bos>` and one target token."""
    before, after = template_parts(template)
    need = int(np.asarray(tokenizer(before + after)).size) + 2
    if seq_len < need:
        raise UserError(
            f"seq_len {seq_len} is too small for the prompt template {template!r}: "
            f"it takes {need - 1} tokens with <bos> before any source text; expected seq_len >= {need}"
        )


def check(data_config):
    """The checks that need no tokenizer (`keras_tune.data.check_data`): TFDS, not files, and a known pair."""
    if data_config.path:
        raise UserError(
            f"--data-path '{data_config.path}' with recipe 'mtnt', which reads TFDS; "
            "expected --data-dir for a TFDS data directory (or recipe 'text' with prompt/response files)"
        )
    if data_config.mtnt_pair not in PAIRS:
        raise UserError(f"data.mtnt_pair '{data_config.mtnt_pair}'; expected one of {', '.join(PAIRS)}")


def source(data_config, tokenizer, seed=0, log=print):
    """Returns the `Source` for MTNT pairs."""
    check(data_config)
    pair = data_config.mtnt_pair
    template = data_config.prompt_template
    if tokenizer is not None:  # None: raw texts, no rows to fit
        check_seq_len(template, tokenizer, int(data_config.seq_len))
    name = f"mtnt/{pair}"
    train, train_where = load_split(name, "train", data_config.data_dir, int(data_config.max_examples))
    val, val_where = load_split(name, "valid", data_config.data_dir, int(data_config.max_validation_examples))
    log(f"mtnt: {train_where}; validation {val_where}")
    return Source(
        recipe="mtnt",
        kind="prompt",
        train=pair_examples(train, template),
        train_source=train_where,
        validation=pair_examples(val, template),
        validation_source=val_where,
    )
