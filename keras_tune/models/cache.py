"""keras_tune's on-disk cache folder.

Everything keras_tune derives once and reuses lives under one root: the tiny
presets' trained tokenizers (`tokenizers/`) and the converted GGUF weights and
tokenizers (`gguf/`). Every entry is keyed by a content hash, so deleting the
folder is always safe: it only costs the time to rebuild.
"""

import os
from pathlib import Path


def cache_dir():
    """Root of keras_tune's on-disk cache.

    `$KERAS_TUNE_CACHE` if set, else `$XDG_CACHE_HOME/keras_tune`, else
    `~/.cache/keras_tune`. Read on every call, so tests can point it elsewhere.
    """
    root = os.environ.get("KERAS_TUNE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "keras_tune"
    )
    return Path(root)
