"""Gemma's SentencePiece vocabulary in a GGUF, both directions: GGUF metadata <-> SentencePiece model.

Reading (`gguf_tokenizer`): the SentencePiece model (BPE, byte fallback, identity
normalization) is rebuilt from the GGUF's pieces, scores and token types, so
ids match the original tokenizer. Writing (`vocabulary_metadata`, then
`write_vocabulary`): the inverse of each rule, for `keras_tune.models.exports.gguf`
(Gemma 3) and `keras_tune.models.gemma4.gguf`.
"""

import re

import numpy as np

from keras_tune import compat
from keras_tune.errors import UserError
from keras_tune.models.gguf import cache as gguf_cache
from keras_tune.models.gguf.file import read_gguf


_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6


_SPACE = "\u2581"  # SentencePiece's spelling of a space


# Pieces llama.cpp's converter writes as control tokens in a Gemma 3 GGUF (from HF's
# "special" added tokens); `<unk>` is written as control too. The importer turns
# them back into user-defined pieces (and `<unk>` into the unknown piece).
_GGUF_CONTROL_PIECE = re.compile(r"^<(mask|unused\d+|start_of_turn|end_of_turn)>$")


def sentencepiece_proto(metadata, path):
    """Serialized SentencePiece ModelProto rebuilt from GGUF tokenizer metadata."""
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    model = metadata.get("tokenizer.ggml.model")
    if model != "llama":
        raise UserError(f"{path}: tokenizer model {model!r} is not supported; expected 'llama' (SentencePiece)")
    tokens = metadata.get("tokenizer.ggml.tokens")
    if not tokens:
        raise UserError(f"{path}: tokenizer.ggml.tokens is missing")
    count = len(tokens)
    scores = np.asarray(metadata.get("tokenizer.ggml.scores", np.zeros(count)), dtype=np.float32)
    types = np.asarray(metadata.get("tokenizer.ggml.token_type", np.full(count, _NORMAL)), dtype=np.int64)
    if len(scores) != count or len(types) != count:
        raise UserError(f"{path}: {count} tokens but {len(scores)} scores and {len(types)} token types")
    special = {
        name: int(metadata.get(f"tokenizer.ggml.{name}_token_id", default))
        for name, default in (("padding", 0), ("eos", 1), ("bos", 2), ("unknown", 3))
    }
    out_of_range = {name: i for name, i in special.items() if not 0 <= i < count}
    if out_of_range:
        raise UserError(f"{path}: special token ids {out_of_range} are outside the {count}-token vocabulary")
    control_ids = {special["padding"], special["eos"], special["bos"]}

    proto = sp_pb2.ModelProto()
    trainer = proto.trainer_spec
    trainer.model_type = sp_pb2.TrainerSpec.BPE
    trainer.vocab_size = count
    trainer.byte_fallback = bool((types == _BYTE).any())
    trainer.unk_id, trainer.bos_id = special["unknown"], special["bos"]
    trainer.eos_id, trainer.pad_id = special["eos"], special["padding"]
    for field, token_id in (("unk", "unknown"), ("bos", "bos"), ("eos", "eos"), ("pad", "padding")):
        setattr(trainer, f"{field}_piece", tokens[special[token_id]])
    add_space_prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", True))
    for spec in (proto.normalizer_spec, proto.denormalizer_spec):
        spec.name = "identity"
        spec.add_dummy_prefix = add_space_prefix
        spec.remove_extra_whitespaces = False
        spec.escape_whitespaces = True

    for token_id, (piece, score, token_type) in enumerate(zip(tokens, scores.tolist(), types.tolist())):
        if token_id == special["unknown"]:
            token_type = _UNKNOWN
        elif token_id in control_ids:
            token_type = _CONTROL
        elif token_type in (_CONTROL, _UNKNOWN):
            # GGUF marks HF's "special" added tokens (<start_of_turn>, <mask>, <unusedN>)
            # as control; HF and chat templates match them atomically in text, which
            # SentencePiece does for user-defined pieces only.
            token_type = _USER_DEFINED
        elif token_type not in (_NORMAL, _USER_DEFINED, _UNUSED, _BYTE):
            raise UserError(f"{path}: token {token_id} {piece!r} has unknown token type {token_type}")
        # llama.cpp writes user-defined whitespace runs (Gemma ids 138-167) with real
        # spaces; SentencePiece escapes every input space to U+2581 before matching, so
        # a literal space could never match.
        proto.pieces.add(piece=piece.replace(" ", _SPACE), score=score, type=token_type)
    serialized = proto.SerializeToString()
    import sentencepiece

    try:
        sentencepiece.SentencePieceProcessor(model_proto=serialized)
    except RuntimeError as error:
        raise UserError(f"{path}: the vocabulary does not form a SentencePiece model: {error}") from None
    return serialized


def gemma3_tokenizer(proto, has_vision_tokens):
    """`Gemma3Tokenizer(proto=proto)`, in 0.4 s instead of 3 s for a 262144-piece vocabulary.

    `set_proto` stores the vocabulary as a list and a dict on the layer, and Keras'
    attribute tracking wraps them and inspects every one of the 2 x 262144 strings
    for variables (2.5 s). Strings hold no state to track, so the proto is set
    with tracking off; `set_proto` is what keras-hub's own `load_assets` calls
    on a tokenizer built without one.
    """
    import keras_hub

    tokenizer = keras_hub.models.Gemma3Tokenizer(proto=None, has_vision_tokens=has_vision_tokens)
    with compat.untracked_attributes():
        tokenizer.set_proto(proto)
    return tokenizer



def tokenizer_of(gguf_file, digest=None):
    """The GGUF's `Gemma3Tokenizer`; with a `digest`, its SentencePiece model is cached."""
    metadata, path = gguf_file.metadata, gguf_file.path
    proto = gguf_cache.read_tokenizer(digest) if digest else None
    if proto is None:
        proto = sentencepiece_proto(metadata, path)
        if digest:
            gguf_cache.write_tokenizer(digest, proto)
    vocabulary = set(metadata["tokenizer.ggml.tokens"])
    has_vision_tokens = all(t in vocabulary for t in ("<img>", "<start_of_image>", "<end_of_image>"))
    try:
        return gemma3_tokenizer(proto, has_vision_tokens)
    except ValueError as error:  # e.g. no "<bos>" piece: not a Gemma vocabulary
        raise UserError(f"{path}: not a Gemma 3 vocabulary: {str(error).splitlines()[0]}") from None


def gguf_tokenizer(path):
    """A `keras_hub.models.Gemma3Tokenizer` rebuilt offline from a GGUF's vocabulary.

    The SentencePiece model (BPE, byte fallback, identity normalization, no dummy
    prefix unless the GGUF asks) is assembled from the GGUF's pieces, scores and
    token types, so ids match the original Gemma 3 tokenizer: `<pad>` 0, `<eos>` 1,
    `<bos>` 2 stay control tokens, `<unk>` 3 becomes the unknown piece, the other
    tokens GGUF marks as control (`<start_of_turn>` 105, `<end_of_turn>` 106,
    `<mask>`, `<unusedN>`) become user-defined so text containing them maps to one
    id each, and whitespace-run pieces stored with literal spaces (ids 138-167)
    are respelled with SentencePiece's `▁`. `export_gguf` inverts each rule.
    Vision tokens are enabled when the vocabulary has `<img>`,
    `<start_of_image>` and `<end_of_image>` (Gemma 3's does). For a quantized
    GGUF the SentencePiece model is cached beside its weights.

    Args:
        path: a GGUF with a SentencePiece (`llama`) tokenizer.
    """
    with read_gguf(path) as gguf_file:
        return tokenizer_of(gguf_file, gguf_cache.cache_digest(gguf_file))


def vocabulary_metadata(tokenizer):
    """(pieces, scores, GGUF token types, special ids, add_space_prefix) from the tokenizer's proto."""
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    proto = sp_pb2.ModelProto()
    proto.ParseFromString(tokenizer.proto)
    pieces, scores, types = [], [], []
    for piece in proto.pieces:
        text, token_type = piece.piece, piece.type
        if token_type == _USER_DEFINED:
            # llama.cpp matches user-defined tokens on the raw text, so spell spaces as spaces.
            text = text.replace(_SPACE, " ")
            if _GGUF_CONTROL_PIECE.match(text):
                token_type = _CONTROL
        elif token_type == _UNKNOWN:
            token_type = _CONTROL
        pieces.append(text)
        scores.append(piece.score)
        types.append(token_type)
    ids = {}
    for name, piece_name in (("bos", "<bos>"), ("eos", "<eos>"), ("pad", "<pad>")):
        ids[name] = tokenizer.token_to_id(piece_name)
    ids["unk"] = next((i for i, piece in enumerate(proto.pieces) if piece.type == _UNKNOWN), 3)
    return pieces, scores, types, ids, proto.normalizer_spec.add_dummy_prefix


def write_vocabulary(writer, pieces, scores, types, ids, add_space_prefix):
    """The `tokenizer.ggml.*` metadata: SentencePiece pieces, scores, types and special ids.

    Args:
        writer: a `gguf.GGUFWriter`.
        pieces, scores, types, ids, add_space_prefix: what `vocabulary_metadata` returns.
    """
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(pieces)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(ids["bos"])
    writer.add_eos_token_id(ids["eos"])
    writer.add_unk_token_id(ids["unk"])
    writer.add_pad_token_id(ids["pad"])
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(add_space_prefix)
