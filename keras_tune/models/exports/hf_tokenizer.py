"""A Hugging Face fast-tokenizer `tokenizer.json` from a keras-hub SentencePiece tokenizer.

keras-hub's Transformers export writes only `tokenizer.model`; Transformers 5
then has to convert it with `sentencepiece` and `protobuf`, which a serving
environment often lacks. `write_tokenizer_json` writes the converted form
directly, built with the `tokenizers` package the way Gemma's official
`tokenizer.json` is laid out:

- model: BPE over the SentencePiece pieces, with byte fallback and `<unk>`;
  merges derived from the vocabulary as Transformers' `SentencePieceExtractor`
  does (every split of a piece into two pieces is a merge, ranked by the merged
  piece's score), restricted to the pieces SentencePiece's BPE can merge (normal
  ones: user-defined and control pieces are atomic, bytes are a fallback);
- normalizer: spaces become `▁`, nothing else (Gemma normalizes nothing);
- pre-tokenizer: Gemma's split on `" "` (a no-op once spaces are `▁`);
- added tokens: every control, unknown and user-defined piece, matched before
  the BPE model as SentencePiece matches them; the user-defined runs of spaces
  (`▁▁`, ...) match in the normalized text, the others in the raw text; control
  pieces, `<unk>`, `<mask>`, `<unusedN>` and the chat turn markers are special;
- post-processor: `<bos>` before each sequence; decoder: `▁` to space, byte
  fallback, fuse.

Encoding then gives SentencePiece's ids, with one deliberate difference that
every Hugging Face tokenizer has: special tokens written literally in the text
(`"<bos>"`) are matched as those tokens, where SentencePiece spells them out.

Example:

```python
from keras_tune.models.hf_tokenizer import write_tokenizer_json
write_tokenizer_json(causal_lm.preprocessor.tokenizer, "out/transformers")
# then: transformers.AutoTokenizer.from_pretrained("out/transformers")
```
"""

import json
import re
from pathlib import Path

from keras_tune.errors import UserError
from keras_tune.rundir import atomic_write

_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6
_SPACE = "\u2581"  # SentencePiece's spelling of a space
# User-defined pieces Gemma's tokenizer marks special (llama.cpp writes them as
# control tokens); other user-defined pieces (whitespace runs, HTML tags) are not.
_SPECIAL_PIECE = re.compile(r"^<(mask|unused\d+|start_of_turn|end_of_turn)>$")


def _model_proto(tokenizer):
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    serialized = getattr(tokenizer, "proto", None)
    if not isinstance(serialized, bytes):
        raise UserError(
            f"tokenizer.json needs a SentencePiece tokenizer (GemmaTokenizer, Gemma3Tokenizer); "
            f"got a {type(tokenizer).__name__} without a proto"
        )
    proto = sp_pb2.ModelProto()
    proto.ParseFromString(serialized)
    if proto.trainer_spec.model_type != sp_pb2.TrainerSpec.BPE:
        raise UserError("tokenizer.json export supports SentencePiece BPE models (Gemma's); this one is not BPE")
    return proto


def _merges(pieces, scores, mergeable):
    """BPE merges as Transformers' `generate_merges(vocab, vocab_scores)` derives them.

    Every way of splitting a mergeable piece into two mergeable pieces is a merge;
    merges rank by the merged piece's score (highest first: SentencePiece merges
    the best-scoring pair first), then longer left and right parts first.
    """
    ids = {piece: i for i, piece in enumerate(pieces)}
    merges = []
    for i, piece in enumerate(pieces):
        if i not in mergeable:
            continue
        local = []
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            left_id, right_id = ids.get(left), ids.get(right)
            if left_id in mergeable and right_id in mergeable:
                local.append((left_id, right_id, left, right))
        local.sort()
        merges.extend((left, right, scores[i]) for _, _, left, right in local)
    merges.sort(key=lambda merge: (merge[2], len(merge[0]), len(merge[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


def build_tokenizer(tokenizer):
    """The `tokenizers.Tokenizer` equivalent to a keras-hub SentencePiece tokenizer.

    Args:
        tokenizer: a keras-hub `GemmaTokenizer` or `Gemma3Tokenizer` (anything
            with a SentencePiece BPE `proto`).

    Returns:
        A `tokenizers.Tokenizer` whose `encode(text, add_special_tokens=False).ids`
        are the keras-hub tokenizer's ids for `text`.

    Raises:
        UserError: the tokenizer has no SentencePiece BPE proto.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE

    proto = _model_proto(tokenizer)
    pieces, scores = [], []
    added = []  # (id, content, special)
    for i, piece in enumerate(proto.pieces):
        text = piece.piece
        if piece.type in (_CONTROL, _UNKNOWN, _USER_DEFINED):
            is_special = piece.type != _USER_DEFINED or bool(_SPECIAL_PIECE.match(text))
            added.append((i, text, is_special))
        pieces.append(text)
        scores.append(piece.score)
    # SentencePiece's BPE only ever merges normal (and unused) pieces.
    mergeable = {i for i, piece in enumerate(proto.pieces) if piece.type in (_NORMAL, _UNUSED)}

    trainer = proto.trainer_spec
    model = BPE(
        vocab={piece: i for i, piece in enumerate(pieces)},
        merges=_merges(pieces, scores, mergeable),
        unk_token=trainer.unk_piece,
        fuse_unk=True,
        byte_fallback=trainer.byte_fallback,
        dropout=None,
    )
    hf_tokenizer = Tokenizer(model)
    if proto.normalizer_spec.add_dummy_prefix:
        # Gemma adds no "▁" prefix; a model that does would need a Prepend("▁") here.
        raise UserError("tokenizer.json export: SentencePiece models with add_dummy_prefix are not supported")
    hf_tokenizer.normalizer = normalizers.Replace(" ", _SPACE)
    hf_tokenizer.pre_tokenizer = pre_tokenizers.Split(" ", "merged_with_previous")
    hf_tokenizer.decoder = decoders.Sequence(
        [decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    # SentencePiece matches user-defined pieces in its normalized text, where every
    # space is already "▁": the whitespace-run pieces ("▁▁", ...) match after the
    # normalizer too (so a literal "▁" in the text joins them, as in SentencePiece).
    hf_tokenizer.add_tokens(
        [AddedToken(text, normalized=_SPACE in text, special=is_special) for _, text, is_special in added]
    )
    for i, text, _ in added:
        if hf_tokenizer.token_to_id(text) != i:  # an added token must keep its SentencePiece id
            raise UserError(f"tokenizer.json export: piece {text!r} would get id {hf_tokenizer.token_to_id(text)}, not {i}")
    bos = pieces[trainer.bos_id] if 0 <= trainer.bos_id < len(pieces) else None
    if bos is not None:
        hf_tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0",
            pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
            special_tokens=[(bos, trainer.bos_id)],
        )
    return hf_tokenizer


def _special_names(proto):
    """{"bos_token": "<bos>", ...}: the pieces SentencePiece's trainer spec names, and `<mask>`."""
    trainer, names = proto.trainer_spec, {}
    for name, index in (("bos", trainer.bos_id), ("eos", trainer.eos_id), ("pad", trainer.pad_id), ("unk", trainer.unk_id)):
        if 0 <= index < len(proto.pieces):
            names[f"{name}_token"] = proto.pieces[index].piece
    if any(piece.piece == "<mask>" for piece in proto.pieces):
        names["mask_token"] = "<mask>"
    return names


def _update_json(path, defaults):
    """Writes `defaults` into the JSON object at `path`, keeping the keys it already has."""
    path = Path(path)
    current = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    merged = {**defaults, **current}
    with atomic_write(path) as partial:
        Path(partial).write_text(json.dumps(merged, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_tokenizer_json(tokenizer, directory):
    """Writes `tokenizer.json` (and the configs Transformers needs) for a SentencePiece tokenizer.

    `tokenizer.json` is always (re)written. `tokenizer_config.json` and
    `special_tokens_map.json` get the entries `AutoTokenizer` needs (Gemma's
    tokenizer class, `<bos>` added, the bos/eos/pad/unk tokens) without
    overwriting any a previous writer (keras-hub's export) put there.

    Args:
        tokenizer: a keras-hub `GemmaTokenizer` or `Gemma3Tokenizer`.
        directory: the Transformers model folder; created if missing.

    Returns:
        The path of `tokenizer.json`.

    Raises:
        UserError: the tokenizer is not a SentencePiece BPE tokenizer.
    """
    hf_tokenizer = build_tokenizer(tokenizer)
    names = _special_names(_model_proto(tokenizer))
    # Transformers' GemmaTokenizer defaults to mask_token "<mask>" and would append
    # it as a new id past the embedding of a vocabulary without one (the tiny ones).
    config_names = {"mask_token": None, **names}
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "tokenizer.json"
    with atomic_write(path) as partial:
        hf_tokenizer.save(partial)
    _update_json(
        directory / "tokenizer_config.json",
        {
            "tokenizer_class": "GemmaTokenizer",
            "add_bos_token": True,
            "add_eos_token": False,
            **config_names,
            "clean_up_tokenization_spaces": False,
            "spaces_between_special_tokens": False,
        },
    )
    _update_json(directory / "special_tokens_map.json", names)
    return path
