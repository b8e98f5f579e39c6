"""Gemma 3 from a GGUF file: architecture from its metadata, weights dequantized, offline.

`load_gguf_causal_lm` turns a GGUF (llama.cpp's format) into a keras-hub
`Gemma3CausalLM` with no network access. What the conversion does:

- Shapes: see `keras_tune.models.gguf.tensors`.
- Norm offset: llama.cpp stores every Gemma 3 RMSNorm weight plus 1, because its
  kernel multiplies by the weight; keras-hub multiplies by `(1 + scale)`. So 1 is
  subtracted on import (and added on export).
- Embeddings are tied: `token_embd` is both the input embedding and the output
  projection; a GGUF with a separate `output.weight` is refused.
- Tokenizer: see `keras_tune.models.gguf.vocabulary`.

For a quantized GGUF the float32 conversion and the rebuilt SentencePiece model
are cached under `cache_dir() / "gguf"` (`keras_tune.models.gguf.cache`), keyed by
the sha256 of the GGUF's bytes, and read back on later loads. A cached load
never runs keras-hub's random initializers: the backbone's variables are created
deferred and get the cached arrays as their first value, one copy each, already
sharded under an active distribution.

Example:

```python
from keras_tune.models.gguf import load, registry
causal_lm = load.load_gguf_causal_lm(registry.registry_gguf_path(), sequence_length=256)
print(causal_lm.generate("def fibonacci(n):", max_length=32))
```
"""

import contextlib
import logging
import time
from pathlib import Path

import numpy as np

from keras_tune import compat
from keras_tune.errors import UserError
from keras_tune.models import quantize as quantize_lib
from keras_tune.models.gguf import cache as gguf_cache
from keras_tune.models.gguf import tensors, vocabulary
from keras_tune.models.gguf.file import dequantizable_types, read_gguf


logger = logging.getLogger(__name__)


def _get(metadata, key, path, default=None, required=True):
    full = f"{tensors.ARCHITECTURE}.{key}"
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
    if arch != tensors.ARCHITECTURE:
        raise UserError(
            f"{gguf_file.path}: architecture {arch!r} is not supported; expected {tensors.ARCHITECTURE!r} "
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
    rope_base = float(_get(metadata, "rope.freq_base", path, default=tensors.GLOBAL_ROPE_BASE))
    local_rope_base = float(_get(metadata, "rope.freq_base_swa", path, default=tensors.LOCAL_ROPE_BASE))
    if (rope_base, local_rope_base) != (tensors.GLOBAL_ROPE_BASE, tensors.LOCAL_ROPE_BASE):
        raise UserError(
            f"{path}: RoPE bases global {rope_base:g} / local {local_rope_base:g} are not supported; "
            f"keras-hub's Gemma3 uses {tensors.GLOBAL_ROPE_BASE:g} / {tensors.LOCAL_ROPE_BASE:g}"
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
        query_head_dim_normalize=num_layers != tensors.LAYERS_SCALED_BY_HIDDEN,
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


def _check_tensors(gguf_file, kwargs):
    """Refuses missing, extra, misshapen or undecodable tensors before anything is built."""
    path = gguf_file.path
    expected = tensors.expected_gguf_shapes(kwargs)
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
    entries = tensors.tensor_map(backbone)
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
            value = tensors.to_keras(gguf_file.tensor(name), kind, shapes[name])
            if writer is not None:
                writer.add(name, value)  # the cache keeps the GGUF's own values
            _initialize(getattr(layer, attr), value - offset if kind == "norm" else value, name)
    return "gguf"


# Float32 embedding rows read at once when quantizing the table from the cache (42 MB for the 270M).
QUANTIZE_ROWS_A_BLOCK = 16384


def _quantize_layer(layer, mode):
    """`layer.quantize(mode)` with keras_tune's config, as `Model.quantize` does for each leaf layer."""
    if callable(getattr(layer, "quantize", None)) and layer.quantization_mode is None:
        try:
            layer.quantize(mode, config=quantize_lib.quantization_config(mode))
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

    config = quantize_lib.quantization_config("int8")
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
            `quantize` (`keras_tune.models.quantize.quantization_config`); from the cache, layer by
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
        digest = gguf_cache.cache_digest(gguf_file)
        tokenizer = vocabulary.tokenizer_of(gguf_file, digest)
        backbone, created = _deferred_backbone(kwargs, dtype)
        norm_offset = 1.0 if _subtract_norm_offset else 0.0
        source = _load_weights(backbone, gguf_file, digest, norm_offset, quantize)
    current = {id(v) for v in backbone.weights}  # quantized layers dropped their float variables
    loaded = {id(getattr(layer, attr)) for _, layer, attr, _ in tensors.tensor_map(backbone)}
    _initialize_leftovers([v for v in created if id(v) in current and id(v) not in loaded])
    if quantize and source == "gguf":  # converted in memory: quantized whole, once loaded
        for _, layer, _, _ in tensors.tensor_map(backbone):
            _quantize_layer(layer, quantize)
    preprocessor_kwargs = {} if sequence_length is None else {"sequence_length": sequence_length}
    preprocessor = keras_hub.models.Gemma3CausalLMPreprocessor(
        tokenizer=tokenizer, image_converter=None, **preprocessor_kwargs
    )
    causal_lm = keras_hub.models.Gemma3CausalLM(backbone=backbone, preprocessor=preprocessor)
    logger.info("loaded %s from %s in %.1f s", Path(path).name, source, time.perf_counter() - started)
    return causal_lm
