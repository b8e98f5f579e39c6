"""Tokenizers trained on a corpus: the library under `python -m keras_tune.tokenizer`.

```
import keras_tune

data = keras_tune.data_config({"data.name": "code", "data.path": "project/**/*.py"})
report = keras_tune.train_tokenizer(data, vocabulary_size=16384, output="code.model")
config = keras_tune.load_config("code_from_scratch", overrides={"model.tokenizer": "code.model", ...})
```
"""

from keras_tune import rundir
from keras_tune.errors import UserError


def tokens_per_byte(proto, texts):
    """Tokens a byte of `texts` makes with the SentencePiece model `proto` (the lower, the more text a row holds).

    Args:
        proto: a serialized SentencePiece model.
        texts: a list of strings.
    """
    import sentencepiece as spm

    processor = spm.SentencePieceProcessor(model_proto=proto)
    size = sum(len(text.encode("utf-8")) for text in texts)
    return sum(len(processor.encode(text)) for text in texts) / max(size, 1)


def gemma3_tokenizer_proto():
    """The Gemma 3 tokenizer of the offline 270M (serialized), or None when its registry package is missing."""
    from keras_tune.models.gguf.registry import registry_gguf_path
    from keras_tune.models.gguf.vocabulary import gguf_tokenizer

    try:
        return gguf_tokenizer(registry_gguf_path()).proto
    except UserError:
        return None


def train_tokenizer(data_config, vocabulary_size, output, max_sentences=1_000_000, seed=0, log=None):
    """Trains a Gemma-style SentencePiece tokenizer on a data recipe's training split and writes it.

    Its validation split measures it: tokens per byte, beside the Gemma 3
    tokenizer's when the offline Gemma 3 270M is installed. Bad input (an
    existing `output`, a vocabulary too small for the special tokens, an empty
    corpus) is refused before the corpus is read.

    Args:
        data_config: the `data` section (`keras_tune.data_config(...)` or a run config's).
        vocabulary_size: pieces in all, at most (a corpus with less to learn gets fewer).
        output: the `.model` file to write; must not exist.
        max_sentences: text pieces SentencePiece keeps, sampled from the corpus (bounds memory).
        seed: the validation hold-out's seed.
        log: `line -> None` for progress counts (None: quiet).

    Returns:
        `{"pieces", "tokens_per_byte", "gemma3_tokens_per_byte"}` (the last two None without held-out text).

    Raises:
        UserError: any of the bad inputs above.
    """
    import sentencepiece as spm

    from keras_tune.data import check_data, texts
    from keras_tune.models.sentencepiece import gemma_settings, train_sentencepiece

    rundir.refuse_existing(output, "--output")
    gemma_settings(vocabulary_size)  # a vocabulary too small: said before the corpus is read
    check_data(data_config)
    train, validation = texts(data_config, seed=seed, log=log)
    proto = train_sentencepiece(train, vocabulary_size, max_sentences=max_sentences, log=log)
    with rundir.atomic_write(output) as partial:
        with open(partial, "wb") as file:
            file.write(proto)
    result = {"pieces": spm.SentencePieceProcessor(model_proto=proto).get_piece_size(),
              "tokens_per_byte": None, "gemma3_tokens_per_byte": None}
    held_out = list(validation) if validation is not None else []
    if held_out:
        result["tokens_per_byte"] = tokens_per_byte(proto, held_out)
        gemma3 = gemma3_tokenizer_proto()
        result["gemma3_tokens_per_byte"] = tokens_per_byte(gemma3, held_out) if gemma3 else None
    return result
