"""Tiny offline tokenizers for the random-init `*_tiny` presets.

A SentencePiece model is trained by this module on a small corpus shipped with the
package (`keras_tune/assets/tiny_corpus.txt`) and cached under the user's cache
directory, so tests and first runs never download a tokenizer. The special tokens
keep Gemma's ids (`<pad>` 0, `<eos>` 1, `<bos>` 2, `<unk>` 3) and the chat turn
markers are single user-defined pieces, so the chat and translation recipes render
exactly as they do with a real Gemma vocabulary. Byte fallback means any text
(accents, emoji, code) tokenizes without `<unk>`.
"""

import hashlib
import io
from importlib import resources
from pathlib import Path

from keras_tune.models import families
from keras_tune.models.cache import cache_dir
from keras_tune.models.sentencepiece import CHAT_TOKENS, gemma_settings
from keras_tune.rundir import atomic_write

TINY_VOCABULARY_SIZE = 1024


def _corpus_text():
    return resources.files("keras_tune.assets").joinpath("tiny_corpus.txt").read_text("utf-8")


def train_tiny_sentencepiece(vocabulary_size=TINY_VOCABULARY_SIZE, user_defined=CHAT_TOKENS):
    """Returns a serialized SentencePiece model trained on the shipped tiny corpus.

    The result is cached by a hash of the corpus and settings; a cached file that
    does not parse is rebuilt.

    Args:
        vocabulary_size: number of pieces, including the 256 byte-fallback pieces.
        user_defined: pieces kept whole (a family's chat turn markers: `Family.tiny_user_symbols`).
    """
    import sentencepiece as spm

    corpus = _corpus_text()
    settings = gemma_settings(vocabulary_size, tuple(user_defined))
    key = hashlib.sha256(f"{sorted(settings.items())}\n{corpus}".encode()).hexdigest()[:16]
    path = cache_dir() / "tokenizers" / f"tiny-{key}.model"
    if path.exists():
        proto = path.read_bytes()
        try:
            spm.SentencePieceProcessor(model_proto=proto)
            return proto
        except RuntimeError:
            pass  # half-written or corrupt cache: train again below
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        # Blocks keep their newlines so code indentation and chat turns get pieces.
        sentence_iterator=iter(block for block in corpus.split("\n\n") if block),
        model_writer=model,
        num_threads=1,
        minloglevel=2,
        **settings,
    )
    proto = model.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as partial:  # readers see the old file or the whole new one
        Path(partial).write_bytes(proto)
    return proto


def tiny_tokenizer(family):
    """Builds the keras-hub tokenizer for a tiny preset of `family`.

    Args:
        family: a registered family name, e.g. "gemma3" (`keras_tune.models.families`).
    """
    family = families.get(family)
    return family.tokenizer(train_tiny_sentencepiece(user_defined=family.tiny_user_symbols()))
