"""Writing a (merged, fine-tuned) Gemma 3 as a llama.cpp `gemma3` GGUF that llama.cpp or Ollama can serve.

Gemma 4 (`gemma4`) is written by its family's writer (`keras_tune.models.gemma4.gguf`),
which `export_gguf` hands over to.

The inverse of `keras_tune.models.gguf.load`: shapes in GGUF order
(`keras_tune.models.gguf.tensors`), norm scales plus llama.cpp's 1, the
vocabulary as `tokenizer.ggml.*` metadata (`keras_tune.models.gguf.vocabulary`).

Example:

```python
from keras_tune.models.exports.gguf import export_gguf
export_gguf(causal_lm, "/tmp/gemma3-tuned-f16.gguf", dtype="f16")
```
"""

import contextlib
from pathlib import Path

import numpy as np

from keras_tune.errors import UserError
from keras_tune.models.gguf import tensors
from keras_tune.models.gguf.vocabulary import vocabulary_metadata, write_vocabulary
from keras_tune.rundir import atomic_write


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
    if backbone.query_head_dim_normalize != (backbone.num_layers != tensors.LAYERS_SCALED_BY_HIDDEN):
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
    writer.add_rope_freq_base(tensors.GLOBAL_ROPE_BASE)
    writer.add_rope_freq_base_swa(tensors.LOCAL_ROPE_BASE)
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


def _family_or_none(causal_lm):
    """The registered family that owns `causal_lm`, or None (then `_export_checks` says what is wrong)."""
    from keras_tune.models import families

    try:
        return families.of_model(causal_lm)
    except UserError:
        return None


def export_gguf(causal_lm, path, *, dtype="f32", context_length=None, name=None):
    """Writes a `Gemma3CausalLM` as a llama.cpp `gemma3` GGUF (F32 or F16), or hands over to the model's family.

    A family with an `export_gguf` method (Gemma 4: `keras_tune.models.gemma4.gguf`)
    writes its own architecture; everything below describes the Gemma 3 writer.

    LoRA is merged on the way out: keras' `EinsumDense.kernel` returns
    `W + (alpha / rank) * A @ B` while LoRA is enabled, and that is what is written.
    Norm scales get llama.cpp's +1; shapes are written in GGUF order; 1-D tensors
    stay F32 in an F16 file, as llama.cpp's converter does. The file is written
    with `rundir.atomic_write`, so `path` is never half-written.

    Args:
        causal_lm: a keras-hub `Gemma3CausalLM` (or a model of a family with
            `export_gguf`) with its preprocessor (tokenizer).
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

    # A family with its own GGUF writer (Gemma 4's `gemma4` architecture) writes it; otherwise Gemma 3's.
    family_writer = getattr(_family_or_none(causal_lm), "export_gguf", None)
    if family_writer is not None:
        return family_writer(causal_lm, path, dtype=dtype, context_length=context_length, name=name)
    backbone, tokenizer = _export_checks(causal_lm, dtype)
    pieces, scores, types, ids, add_space_prefix = vocabulary_metadata(tokenizer)
    vocab_rows = backbone.vocabulary_size
    if len(pieces) > vocab_rows:
        raise UserError(f"the tokenizer has {len(pieces)} pieces but the embedding only {vocab_rows} rows")
    path = Path(path)
    if context_length is None:
        context_length = 32768 if backbone.num_layers <= 26 else 131072
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as partial, contextlib.closing(gguf.GGUFWriter(partial, tensors.ARCHITECTURE)) as writer:
        _write_architecture(writer, backbone, name or path.stem, context_length, dtype)
        write_vocabulary(writer, pieces, scores, types, ids, add_space_prefix)
        for tensor_name, layer, attr, kind in tensors.tensor_map(backbone):
            value = np.asarray(ops.convert_to_numpy(getattr(layer, attr)), dtype=np.float32)
            if kind == "norm":
                value = value + np.float32(1.0)
            if kind == "embedding":
                value = value[: len(pieces)]
            value = np.ascontiguousarray(tensors.to_gguf(value, kind))
            if dtype == "f16" and value.ndim > 1:
                value = value.astype(np.float16)
            writer.add_tensor(tensor_name, value)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    return path
