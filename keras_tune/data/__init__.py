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

from collections import Counter

from keras_tune import environment
from keras_tune.data import chat, code, corpus, imdb, mtnt, shards, text
from keras_tune.data.pipeline import DataBundle, Source, make_bundle
from keras_tune.data.report import DataReport, SplitReport
from keras_tune.errors import UserError

RECIPES = {"imdb": imdb, "mtnt": mtnt, "code": code, "text": text, "chat": chat}
# Recipes of documents, whose corpora may go through token shards on disk (`keras_tune.data.shards`).
SHARDABLE = ("code", "text")
# Recipes that read files at --data-path.
FILE_RECIPES = ("code", "text", "chat")


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
    recipe = _recipe(data_config)
    recipe.check(data_config)
    if data_config.path and data_config.name in FILE_RECIPES:
        _check_corpus(data_config, corpus.corpus_files(data_config, recipe.SUFFIXES), data_config.path)
    if data_config.get("validation_path"):
        _check_corpus(data_config, corpus.corpus_files(data_config, recipe.SUFFIXES, validation=True),
                      data_config.validation_path)


def _check_corpus(data_config, paths, where):
    """An empty corpus, or a Parquet/Arrow file that cannot be read, is one line before anything is built."""
    shardable = data_config.name in SHARDABLE
    field = "content" if data_config.name == "code" and data_config.text_field == "text" else data_config.text_field
    corpus.check_readable(paths, field if shardable and _sharded(data_config) else None)
    if not corpus.has_text(paths):
        raise UserError(f"--data-path '{where}': its {len(paths)} file(s) hold no text; expected a corpus")


def prompt_format(data_config):
    """How a model tuned on the recipe is prompted: "chat" (turns) or "plain".

    Args:
        data_config: the `data` section of the run config.
    """
    return _recipe(data_config).PROMPT_FORMAT


def texts(data_config, seed=0, log=print):
    """A recipe's training and validation texts, untokenized: `(train iterable, validation iterable or None)`.

    Each example's segments are joined (a prompt and its response, a chat's
    turns): what a tokenizer trained for the recipe will have to cut. Read
    lazily, an example at a time; a corpus the run would shard (`_sharded`)
    streams from its files, and its held-out texts fill the validation list as
    the training texts are read. Either way the held-out texts are the ones the
    run with the same `seed` validates on.

    Args:
        data_config: the `data` section of the run config.
        seed: fixes the validation hold-out, as `make_datasets` does.
        log: callable for progress lines (None for quiet).
    """
    environment.keep_tensorflow_off_accelerators()
    recipe = _recipe(data_config)
    if _sharded(data_config):  # streamed: a corpus larger than memory trains too
        paths = corpus.corpus_files(data_config, recipe.SUFFIXES)
        validation_paths = corpus.corpus_files(data_config, recipe.SUFFIXES, validation=True) \
            if data_config.get("validation_path") else []
        held = []  # filled while the training texts are read

        def train():
            for document, validation in shards.selected(data_config, paths, validation_paths, seed, Counter()):
                if validation:
                    held.append(document)
                else:
                    yield document

        return train(), held
    source = recipe.source(data_config, None, seed=seed, log=log or (lambda line: None))

    def read(dataset):
        for example in dataset.as_numpy_iterator():
            yield b"".join(example["segments"]).decode("utf-8", "replace")

    return read(source.train), (read(source.validation) if source.validation is not None else None)


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
    if _sharded(data_config):
        return shards.make_sharded_datasets(data_config, tokenizer, _recipe(data_config).SUFFIXES, seed=seed, log=log)
    source = _recipe(data_config).source(data_config, tokenizer, seed=seed, log=log)
    return make_bundle(source, tokenizer, data_config, seed=seed, log=log)


def _sharded(data_config):
    """Whether the corpus goes through token shards: a document corpus (code, text) that asks or is large."""
    if data_config.name not in SHARDABLE or not data_config.path or data_config.get("shards", "auto") == "off":
        return False
    return shards.wanted(data_config, corpus.corpus_files(data_config, _recipe(data_config).SUFFIXES))


__all__ = ["check_data", "make_datasets", "prompt_format", "texts", "DataBundle", "DataReport", "SplitReport", "Source", "RECIPES"]
