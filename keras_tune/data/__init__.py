"""Data for fine-tuning: a named recipe in, batched `(x, y, sample_weight)` datasets out.

Recipes (one file each): `imdb` (TFDS imdb_reviews), `mtnt` (TFDS mtnt/<pair>),
`code` (Python sources), `text` (your .txt/.jsonl/.json/.csv files), `chat`
(instruction data in Gemma's turn format). They all go through one pipeline
(`pipeline.py`): tokenize in tf.data with the preset's tokenizer, mask, then
pack, bucket or pad into static-shape batches.

Example:

```python
import keras_tune
from keras_tune.data import make_datasets
from keras_tune.models.tiny import tiny_tokenizer

config = keras_tune.load_config("gemma3_tiny", overrides={"data.name": "text", "data.path": "notes.txt"})
bundle = make_datasets(config.data, tiny_tokenizer("gemma3"), seed=0)
print(bundle.report.summary())
x, y, sample_weight = next(iter(bundle.train))  # token_ids/padding_mask [B, L], y, weight [B, L]
# causal_lm.fit(bundle.train_stream(), steps_per_epoch=bundle.steps_per_epoch,  # each epoch reshuffled
#               validation_data=bundle.validation)   # with causal_lm.preprocessor = None
```
"""

from keras_tune import environment
from keras_tune.data import chat, code, imdb, mtnt, text
from keras_tune.data.pipeline import DataBundle, Source, make_bundle
from keras_tune.data.report import DataReport, SplitReport
from keras_tune.errors import UserError

RECIPES = {"imdb": imdb, "mtnt": mtnt, "code": code, "text": text, "chat": chat}


def _recipe(data_config):
    """The recipe module `data_config.name` names, or a `UserError` listing the known ones."""
    recipe = RECIPES.get(data_config.name)
    if recipe is None:
        raise UserError(f"--data '{data_config.name}'; expected one of {', '.join(RECIPES)}")
    return recipe


def check_data(data_config):
    """Checks what needs no tokenizer, so a mistake costs no model load: the recipe and where it reads.

    A file recipe's `--data-path` must match files of its kinds; the TFDS recipes
    take none. Reading and tokenizing (`make_datasets`) checks the rest.

    Args:
        data_config: the `data` section of the run config.

    Raises:
        UserError: the recipe is unknown, or its input cannot be found.
    """
    _recipe(data_config).check(data_config)


def prompt_format(data_config):
    """How a model tuned on the recipe is prompted: "chat" (turns) or "plain".

    Args:
        data_config: the `data` section of the run config.
    """
    return _recipe(data_config).PROMPT_FORMAT


def make_datasets(data_config, tokenizer, seed=0, log=print):
    """Returns a `DataBundle` (train, validation, report, steps_per_epoch) for a recipe.

    Everything about the input is checked here, before any training: a bad path,
    field, file, split or length raises `keras_tune.errors.UserError`.
    TensorFlow is first limited to the CPU (`keras_tune.environment`), so tf.data
    never takes a GPU or TPU from JAX.

    Args:
        data_config: the `data` section of the run config (`ml_collections.ConfigDict`).
        tokenizer: the preset's keras-hub `GemmaTokenizer` or `Gemma3Tokenizer`.
        seed: fixes the validation hold-out, shuffling and bucket mixing: the same
            seed gives the same batches.
        log: callable for progress lines (None for quiet).
    """
    environment.keep_tensorflow_off_accelerators()  # before any tf.data work
    log = log or (lambda line: None)
    source = _recipe(data_config).source(data_config, tokenizer, seed=seed, log=log)
    return make_bundle(source, tokenizer, data_config, seed=seed, log=log)


__all__ = ["check_data", "make_datasets", "prompt_format", "DataBundle", "DataReport", "SplitReport", "Source", "RECIPES"]
