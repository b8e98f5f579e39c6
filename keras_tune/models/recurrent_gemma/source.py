"""Official RecurrentGemma checkpoints as a model source (`model.source = "flax"`).

`model.handle` is either a Kaggle handle of the official Flax release,
`kaggle://google/recurrentgemma/flax/<2b|2b-it|9b|9b-it>[/<version>]`
(downloaded with kagglehub, which needs Kaggle credentials and the Gemma
license accepted), or a local directory in the same layout: the SentencePiece
`tokenizer.model` and an Orbax checkpoint directory (named after the
variation), or the checkpoint directory itself with `tokenizer.model` next to
it or inside it.

Example:

```python
causal_lm = load_causal_lm(config)   # config.model.source == "flax"
```
"""

import glob
import os

from keras_tune.errors import UserError

TOKENIZER_FILE = "tokenizer.model"
# Files an Orbax checkpoint directory holds, in any of its formats.
_CHECKPOINT_MARKERS = ("_METADATA", "checkpoint", "manifest.ocdbt")


def _is_checkpoint(directory):
    return any(os.path.exists(os.path.join(directory, name)) for name in _CHECKPOINT_MARKERS)


def find_files(directory):
    """Finds the checkpoint and the tokenizer of an official release directory.

    Args:
        directory: a downloaded (or copied) release, or its checkpoint directory.

    Returns:
        `(checkpoint directory, tokenizer.model path)`.
    """
    if _is_checkpoint(directory):
        checkpoint = directory
    else:
        found = sorted(
            os.path.join(directory, name) for name in os.listdir(directory)
            if os.path.isdir(os.path.join(directory, name)) and _is_checkpoint(os.path.join(directory, name))
        )
        if len(found) != 1:
            raise UserError(
                f"model.handle {directory}: {len(found)} Orbax checkpoint directories found"
                f"{' (' + ', '.join(os.path.basename(f) for f in found) + ')' if found else ''}; "
                "expected one, as in the official release (e.g. 2b/ next to tokenizer.model)"
            )
        checkpoint = found[0]
    for folder in (checkpoint, os.path.dirname(checkpoint)):
        if os.path.isfile(os.path.join(folder, TOKENIZER_FILE)):
            return checkpoint, os.path.join(folder, TOKENIZER_FILE)
    raise UserError(
        f"model.handle {directory}: no {TOKENIZER_FILE} found; expected it next to the checkpoint directory"
    )


def _kaggle_cached(handle):
    cache = os.environ.get("KAGGLEHUB_CACHE") or os.path.expanduser("~/.cache/kagglehub")
    parts = handle.removeprefix("kaggle://").split("/")
    version = parts[4] if len(parts) > 4 else "*"
    return bool(glob.glob(os.path.join(cache, "models", *parts[:4], version, TOKENIZER_FILE)))


def check_source(handle):
    """Cheap checks that the official checkpoint can be reached, before anything is built.

    Args:
        handle: a `kaggle://google/recurrentgemma/flax/...` handle or a local directory.
    """
    if handle.startswith("kaggle://"):
        from keras_tune.models.kaggle import kaggle_credentials_problem

        problem = None if _kaggle_cached(handle) else kaggle_credentials_problem(handle)
        if problem:
            raise UserError(problem.replace("the Gemma license", "the Gemma license (RecurrentGemma)"))
        return
    if not os.path.isdir(handle):
        raise UserError(
            f"model.handle {handle}: no such directory; expected kaggle://google/recurrentgemma/flax/<variation> "
            f"or a directory with {TOKENIZER_FILE} and the Orbax checkpoint"
        )
    find_files(handle)


def download(handle):
    """The local directory of `handle`, downloading a Kaggle release first (kagglehub caches it).

    Args:
        handle: a `kaggle://...` handle or a local directory.
    """
    if not handle.startswith("kaggle://"):
        return handle
    import kagglehub

    try:
        return kagglehub.model_download(handle.removeprefix("kaggle://"))
    except (OSError, ValueError, ConnectionError) as error:  # kagglehub's HTTP and auth errors among them
        raise UserError(f"could not download {handle}: {type(error).__name__}: {str(error).splitlines()[0]}")


def load_causal_lm(config):
    """Builds the config's `RecurrentGemmaCausalLM` and loads the official weights into it.

    Variables are created under the active distribution (with their sharding),
    then every one is assigned from the checkpoint read into host memory.

    Args:
        config: a validated run config with `model.source == "flax"`.
    """
    from keras_tune.models.recurrent_gemma import (
        RecurrentGemmaBackbone,
        RecurrentGemmaCausalLM,
        RecurrentGemmaCausalLMPreprocessor,
        gemma_tokenizer,
    )
    from keras_tune.models.recurrent_gemma.convert import load_params, read_checkpoint

    checkpoint, tokenizer_path = find_files(download(config.model.handle))
    tokenizer = gemma_tokenizer(tokenizer_path)
    arch = dict(config.model.arch)
    if tokenizer.vocabulary_size() != arch["vocabulary_size"]:
        raise UserError(
            f"{tokenizer_path}: {tokenizer.vocabulary_size()} pieces but model.arch.vocabulary_size is "
            f"{arch['vocabulary_size']}; expected the tokenizer of the same release"
        )
    backbone = RecurrentGemmaBackbone(**arch, dtype=config.train.precision)
    load_params(backbone, read_checkpoint(checkpoint))
    preprocessor = RecurrentGemmaCausalLMPreprocessor(tokenizer=tokenizer, sequence_length=config.data.seq_len)
    return RecurrentGemmaCausalLM(backbone=backbone, preprocessor=preprocessor)
