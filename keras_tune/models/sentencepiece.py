"""Training a SentencePiece tokenizer the way Gemma's is built, on any text: the tiny presets' and a corpus's own.

Gemma's vocabulary is a byte-fallback BPE with no normalization: whitespace runs,
newlines and tabs survive (code keeps its indentation), digits are split one a
piece, and the special tokens keep Gemma's ids (`<pad>` 0, `<eos>` 1, `<bos>` 2,
`<unk>` 3), with the chat turn markers as single pieces. `train_sentencepiece`
trains one with these settings on texts streamed from anywhere, holding at most
`max_sentences` pieces of text in memory (SentencePiece samples that many
uniformly from everything it is given), so a corpus larger than memory trains
a tokenizer too.

Example:

```python
from keras_tune.models.sentencepiece import train_sentencepiece
proto = train_sentencepiece(open(path).read() for path in files), vocabulary_size=8192)
```
"""

import io

from keras_tune.errors import UserError

CHAT_TOKENS = ("<start_of_turn>", "<end_of_turn>")
SPECIAL_PIECES = ("<pad>", "<eos>", "<bos>", "<unk>")
BYTE_PIECES = 256
# SentencePiece reads its input a "sentence" at a time and skips longer ones; a
# long document goes in as pieces of whole lines of at most this many bytes.
MAX_SENTENCE_BYTES = 4096


def minimum_vocabulary_size(user_defined=CHAT_TOKENS):
    """The smallest vocabulary with Gemma's special tokens, the turn markers and the 256 byte pieces, plus one.

    Args:
        user_defined: the pieces kept whole besides the specials.
    """
    return BYTE_PIECES + len(SPECIAL_PIECES) + len(user_defined) + 1


def gemma_settings(vocabulary_size, user_defined=CHAT_TOKENS):
    """`SentencePieceTrainer` settings for a Gemma-style vocabulary of `vocabulary_size` pieces.

    Args:
        vocabulary_size: pieces in all (the 256 byte pieces and the specials included).
        user_defined: pieces that always tokenize whole (the chat turn markers).
    """
    smallest = minimum_vocabulary_size(user_defined)
    if vocabulary_size < smallest:
        raise UserError(f"--vocab-size {vocabulary_size}: too small for Gemma's {len(SPECIAL_PIECES)} special tokens, "
                        f"{len(user_defined)} turn markers and {BYTE_PIECES} byte pieces; expected at least {smallest}")
    return dict(
        vocab_size=int(vocabulary_size),
        model_type="bpe",
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        pad_piece="<pad>",
        eos_piece="<eos>",
        bos_piece="<bos>",
        unk_piece="<unk>",
        user_defined_symbols=list(user_defined),
        byte_fallback=True,
        split_digits=True,
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        # Gemma's own tokenizer does no normalization: newlines and tabs survive.
        normalization_rule_name="identity",
        character_coverage=1.0,
    )


def sentences(text, limit=MAX_SENTENCE_BYTES):
    """A text cut at line ends into pieces of at most `limit` bytes (a longer line alone is cut inside).

    Args:
        text: a document.
        limit: bytes a piece may hold.
    """
    piece, size = [], 0
    for line in text.splitlines(keepends=True):
        length = len(line.encode("utf-8"))
        if piece and size + length > limit:
            yield "".join(piece)
            piece, size = [], 0
        while length > limit:  # one huge line: whole characters, as many as fit
            cut = len(line.encode("utf-8")[:limit].decode("utf-8", "ignore"))
            yield line[:cut]
            line = line[cut:]
            length = len(line.encode("utf-8"))
        if line:
            piece.append(line)
            size += length
    if piece:
        yield "".join(piece)


def train_sentencepiece(texts, vocabulary_size, max_sentences=1_000_000, log=None):
    """Trains a Gemma-style SentencePiece model on `texts` and returns it serialized.

    Args:
        texts: an iterable of documents (read once, lazily).
        vocabulary_size: pieces in all, at most (a corpus with less to learn gets fewer).
        max_sentences: most text pieces SentencePiece keeps (sampled uniformly
            from all it reads, with its own fixed seed): bounds the memory
            whatever the corpus size.
        log: `line -> None` for a progress count every 10,000 documents (None: quiet).

    Raises:
        UserError: no text at all, or a vocabulary too small.
    """
    import sentencepiece as spm

    settings = gemma_settings(vocabulary_size)
    counts = {"documents": 0, "bytes": 0}

    def stream():
        for text in texts:
            counts["documents"] += 1
            counts["bytes"] += len(text.encode("utf-8"))
            if log and counts["documents"] % 10_000 == 0:
                log(f"  tokenizer: read {counts['documents']:,} documents ({counts['bytes'] / 1e6:,.1f} MB)")
            yield from sentences(text)

    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=stream(), model_writer=model, num_threads=2, minloglevel=2,
            input_sentence_size=int(max_sentences), shuffle_input_sentence=True,
            hard_vocab_limit=False,  # a corpus with fewer pieces to learn gets a smaller vocabulary, not an error
            **settings,
        )
    except RuntimeError as error:
        if not counts["bytes"]:
            raise UserError("the corpus holds no text; expected documents to train a tokenizer on") from None
        raise UserError(f"SentencePiece could not train a {vocabulary_size}-piece vocabulary on "
                        f"{counts['documents']} documents ({str(error).strip().splitlines()[-1]}); expected more "
                        "text or a smaller --vocab-size") from None
    if log:
        log(f"  tokenizer: {counts['documents']:,} documents, {counts['bytes'] / 1e6:,.1f} MB")
    return model.getvalue()


def read_sentencepiece(path):
    """The serialized SentencePiece model in `path`, checked to be one (a Gemma-style vocabulary).

    Args:
        path: a `.model` file written by `train_sentencepiece` (or Gemma's own `tokenizer.model`).

    Raises:
        UserError: no such file, or not a SentencePiece model with Gemma's special tokens.
    """
    import sentencepiece as spm

    try:
        with open(path, "rb") as file:
            proto = file.read()
    except OSError as error:
        raise UserError(f"--tokenizer {path}: cannot read it ({error.strerror}); expected a SentencePiece .model file")
    try:
        processor = spm.SentencePieceProcessor(model_proto=proto)
    except RuntimeError:
        raise UserError(f"--tokenizer {path}: not a SentencePiece model; expected a .model file written by "
                        "python -m keras_tune.tokenizer train") from None
    specials = [processor.id_to_piece(i) for i in range(min(4, processor.get_piece_size()))]
    if specials != list(SPECIAL_PIECES):
        raise UserError(f"--tokenizer {path}: its first pieces are {specials}; expected Gemma's {list(SPECIAL_PIECES)} "
                        "(python -m keras_tune.tokenizer train writes them)")
    return proto


def vocabulary_size(path):
    """Pieces in the SentencePiece model at `path` (checked as `read_sentencepiece` does).

    Args:
        path: a `.model` file.
    """
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_proto=read_sentencepiece(path)).get_piece_size()
