"""A text-only Gemma 4 as a llama.cpp `gemma4` GGUF: the Transformers tensors renamed, llama.cpp's metadata.

llama.cpp's converter reads Transformers' `Gemma4ForCausalLM` names; the
tensors here are the ones the Transformers export writes (keras-hub's weight
map, each expert bank's LoRA update folded in), named by gguf-py's
`TensorNameMap` for `MODEL_ARCH.GEMMA4`. What gguf-py's map does not cover is
named as llama.cpp's converter names it: the router's input scale and the
per-expert output scale ride on `ffn_gate_inp` / `ffn_down_exps` as `.scale`,
and `rope_freqs` (global layers only) keeps RoPE off the dimensions a
"proportional" partial rotation leaves unrotated. Gemma 4 norms multiply by
their scale as stored (no `1 +`), so norms are written unchanged.

Example:

```python
export_gemma4_gguf(causal_lm, "/tmp/gemma4-tuned-f16.gguf", context_length=131072, dtype="f16")
```
"""

import contextlib
from pathlib import Path

import numpy as np

from keras_tune import compat
from keras_tune.errors import UserError
from keras_tune.rundir import atomic_write

ARCHITECTURE = "gemma4"
# llama.cpp's converter sets a frequency factor this large on the dimensions RoPE must leave alone.
_UNROTATED_FREQUENCY_FACTOR = 1e30


def _hf_tensors(causal_lm):
    """`(Transformers config dict, {Transformers name: float32 array})` of the (merged) model."""
    from keras_tune.models.gemma4.transformers import transformers_config, transformers_tensors

    get_config, get_weights_map, _ = compat.kerashub_gemma4_transformers_export()
    backbone = causal_lm.backbone
    config = transformers_config(backbone, get_config(backbone, include_lm_head=True))
    tensors = transformers_tensors(backbone, get_weights_map(backbone, include_lm_head=True))
    return config, {name: value.astype(np.float32) for name, value in tensors.items()}


def _gguf_name(name_map, hf_name):
    """llama.cpp's name of one Transformers tensor, as llama.cpp's `convert_hf_to_gguf.py` gives it."""
    block = hf_name.split(".layers.")[1].split(".")[0] if ".layers." in hf_name else None
    if hf_name.endswith("router.scale"):
        return f"blk.{block}.ffn_gate_inp.scale"
    if hf_name.endswith("router.per_expert_scale"):
        return f"blk.{block}.ffn_down_exps.scale"
    if hf_name.endswith(("layer_scalar", "experts.gate_up_proj", "experts.down_proj")):
        hf_name += ".weight"  # bare parameters in Transformers, `.weight` tensors in GGUF
    gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight",))
    if gguf_name is None:
        raise UserError(f"GGUF export: llama.cpp's gemma4 has no tensor for {hf_name}")
    return gguf_name


def _rope_frequency_factors(config):
    """`rope_freqs` for the global layers: 1 on the rotated pairs, a huge factor (no rotation) on the rest."""
    full = config["rope_parameters"]["full_attention"]
    half = config["global_head_dim"] // 2
    rotated = int(config["global_head_dim"] * full.get("partial_rotary_factor", 1.0) / 2)
    return np.array([1.0] * rotated + [_UNROTATED_FREQUENCY_FACTOR] * (half - rotated), dtype=np.float32)


def kv_sharing_problem(layer_types, num_kv_shared_layers):
    """Why llama.cpp would share keys and values between other layers than this model does, or None.

    The model reuses, in each shared layer, the last earlier layer of its kind
    (sliding or global) that owns keys and values; llama.cpp's `gemma4` takes
    the second-to-last owning layer for a sliding one and the last for a global
    one, which agrees only where the owning layers end with a sliding then a
    global layer (as E2B and E4B do).

    Args:
        layer_types: "sliding_attention" / "full_attention" per layer.
        num_kv_shared_layers: how many last layers own no keys and values.
    """
    first_shared = len(layer_types) - num_kv_shared_layers
    for kind in sorted({str(kind) for kind in layer_types[first_shared:]}):
        ours = max((i for i in range(first_shared) if layer_types[i] == kind), default=None)
        llama_cpp = first_shared - (2 if kind == "sliding_attention" else 1)
        if ours != llama_cpp:
            return (f"its {kind} layers from {first_shared} on reuse layer {ours}'s keys and values, and llama.cpp's "
                    f"gemma4 would read layer {llama_cpp}'s (llama.cpp expects the layers that own keys and values "
                    "to end with a sliding then a global layer)")
    return None


def _write_architecture(writer, config, name, context_length):
    """The `gemma4.*` metadata llama.cpp reads to build the model (what its converter writes)."""
    layers = config["num_hidden_layers"]
    sliding = [kind == "sliding_attention" for kind in config["layer_types"]]
    writer.add_name(name)
    writer.add_type("model")
    writer.add_context_length(context_length)
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(layers)
    ffw = config["intermediate_size"]
    first_shared = layers - config["num_kv_shared_layers"]
    if config.get("use_double_wide_mlp"):  # the layers that share keys and values have twice the MLP
        writer.add_feed_forward_length([ffw if i < first_shared else 2 * ffw for i in range(layers)])
    else:
        writer.add_feed_forward_length(ffw)
    writer.add_head_count(config["num_attention_heads"])
    global_kv_heads = config.get("num_global_key_value_heads") or config["num_key_value_heads"]
    writer.add_head_count_kv([config["num_key_value_heads"] if swa else global_kv_heads for swa in sliding])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_key_length(config["global_head_dim"])
    writer.add_value_length(config["global_head_dim"])
    writer.add_key_length_swa(config["head_dim"])
    writer.add_value_length_swa(config["head_dim"])
    # "proportional" RoPE on global layers: all dimensions count, `rope_freqs` switches the unrotated ones off.
    writer.add_rope_dimension_count(config["global_head_dim"])
    writer.add_rope_dimension_count_swa(config["head_dim"])
    writer.add_rope_freq_base(config["rope_parameters"]["full_attention"]["rope_theta"])
    writer.add_rope_freq_base_swa(config["rope_parameters"]["sliding_attention"]["rope_theta"])
    writer.add_sliding_window(min(config["sliding_window"], context_length))
    writer.add_sliding_window_pattern(sliding)
    writer.add_shared_kv_layers(config["num_kv_shared_layers"])
    writer.add_embedding_length_per_layer_input(config.get("hidden_size_per_layer_input") or 0)
    if config.get("final_logit_softcapping"):
        writer.add_final_logit_softcapping(config["final_logit_softcapping"])
    if config.get("enable_moe_block"):
        writer.add_expert_count(config["num_experts"])
        writer.add_expert_used_count(config["top_k_experts"])
        writer.add_expert_feed_forward_length(config["moe_intermediate_size"])


def export_gemma4_gguf(causal_lm, path, *, context_length, dtype="f32", name=None):
    """Writes a `Gemma4TextCausalLM` as a llama.cpp `gemma4` GGUF (F32 or F16).

    LoRA on dense layers is merged by their kernels (`kernel` returns
    `W + (alpha / rank) * A @ B` while LoRA is enabled), on experts by
    `transformers_tensors`. 1-D tensors stay F32 in an F16 file, as llama.cpp's
    converter keeps them. Written with `rundir.atomic_write`.

    Args:
        causal_lm: a `Gemma4TextCausalLM` with its preprocessor (its SentencePiece tokenizer).
        path: output `.gguf` path.
        dtype: "f32" or "f16".
        context_length: `gemma4.context_length` to record (the family's `context_length`).
        name: `general.name`; defaults to the file's stem.

    Raises:
        UserError: a bad dtype, no SentencePiece tokenizer, or keys and values
            shared in a way llama.cpp does not (`kv_sharing_problem`).
    """
    import gguf

    from keras_tune.models.gguf.vocabulary import vocabulary_metadata, write_vocabulary

    if dtype not in ("f32", "f16"):
        raise UserError(f"export dtype {dtype!r} is not supported; expected 'f32' or 'f16'")
    tokenizer = getattr(getattr(causal_lm, "preprocessor", None), "tokenizer", None)
    if getattr(tokenizer, "proto", None) is None:
        raise UserError("GGUF export needs the model's SentencePiece tokenizer (causal_lm.preprocessor.tokenizer)")
    pieces, scores, types, ids, add_space_prefix = vocabulary_metadata(tokenizer)
    config, tensors = _hf_tensors(causal_lm)
    problem = kv_sharing_problem(config["layer_types"], config["num_kv_shared_layers"])
    if problem:
        raise UserError(f"this Gemma 4 model cannot be written as a llama.cpp gemma4 GGUF: {problem}")
    if len(pieces) > config["vocab_size"]:
        raise UserError(f"the tokenizer has {len(pieces)} pieces but the embedding only {config['vocab_size']} rows")
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA4, config["num_hidden_layers"])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as partial, contextlib.closing(gguf.GGUFWriter(partial, ARCHITECTURE)) as writer:
        _write_architecture(writer, config, name or path.stem, context_length)
        file_type = gguf.LlamaFileType.ALL_F32 if dtype == "f32" else gguf.LlamaFileType.MOSTLY_F16
        writer.add_file_type(int(file_type))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        write_vocabulary(writer, pieces, scores, types, ids, add_space_prefix)
        writer.add_tensor("rope_freqs.weight", _rope_frequency_factors(config))
        for hf_name, value in tensors.items():
            if hf_name == "lm_head.weight":
                continue  # tied to the token embedding
            if hf_name == "model.embed_tokens.weight":
                value = value[: len(pieces)]  # llama.cpp sizes the vocabulary by the embedding's rows
            if dtype == "f16" and value.ndim > 1:
                value = value.astype(np.float16)
            writer.add_tensor(_gguf_name(name_map, hf_name), np.ascontiguousarray(value))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    return path
