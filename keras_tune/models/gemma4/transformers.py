"""A text-only Gemma 4 as a Transformers `Gemma4ForCausalLM` checkpoint (keras-hub's weight map, its config mended).

keras-hub 0.32's Gemma 4 exporter writes, for a text-only backbone, the
architecture `Gemma4TextForCausalLM` (Transformers has `Gemma4ForCausalLM`),
omits `attention_k_eq_v` (Transformers then builds separate value projections
for the global layers, which the checkpoint lacks) and the RoPE types (the
global layers' rotation is Transformers' "proportional" one). `transformers_config`
writes them; the tensors are keras-hub's (`get_gemma4_weights_map`), the
experts' with their LoRA update folded in.

Example:

```python
export_transformers(causal_lm, "out/hf")   # then transformers.AutoModelForCausalLM.from_pretrained("out/hf")
```
"""

import json
import os

import numpy as np

from keras_tune import compat

ARCHITECTURE = "Gemma4ForCausalLM"


def transformers_config(backbone, keras_hub_config):
    """keras-hub's config dict for `backbone`, mended so Transformers builds the same model.

    Args:
        backbone: a `Gemma4TextBackbone`.
        keras_hub_config: what keras-hub's `get_gemma4_config(backbone, include_lm_head=True)` returns.
    """
    config = dict(keras_hub_config)
    config["architectures"] = [ARCHITECTURE]
    config["model_type"] = "gemma4_text"
    config["attention_k_eq_v"] = backbone.num_global_key_value_heads is not None
    config["rope_parameters"] = {
        "full_attention": {"rope_type": "proportional", "rope_theta": backbone.global_rope_wavelength or 1_000_000.0,
                           "partial_rotary_factor": backbone.global_rope_partial_rotary_factor},
        "sliding_attention": {"rope_type": "default", "rope_theta": backbone.local_rope_wavelength or 10_000.0},
    }
    config["global_head_dim"] = backbone.global_head_dim or backbone.head_dim
    config["layer_types"] = [str(kind) for kind in backbone.layer_types]  # a plain list, not Keras' tracked one
    config["tie_word_embeddings"] = True
    if not backbone.use_sliding_window_attention:  # a window as long as any input means none
        config["sliding_window"] = 1 << 30
    for unused in ("_sliding_window_pattern", "attn_logit_softcapping"):
        if config.get(unused) is None:
            config.pop(unused, None)
    return config


def _numpy(value):
    from keras import ops

    return np.ascontiguousarray(np.asarray(ops.convert_to_numpy(value)))


def transformers_tensors(backbone, weights_map):
    """`{name: numpy array}` of keras-hub's weight map, with each expert bank's LoRA update folded in.

    Args:
        backbone: a `Gemma4TextBackbone`.
        weights_map: what keras-hub's `get_gemma4_weights_map(backbone, include_lm_head=True)` returns.
    """
    tensors = {name: _numpy(value) for name, value in weights_map.items()}
    for i, block in enumerate(backbone.transformer_layers):
        if not block.enable_moe_block or not block.moe_expert_bank.lora_enabled:
            continue
        bank = block.moe_expert_bank
        key = next(name for name in tensors if name.endswith(f"layers.{i}.experts.gate_up_proj"))
        gate, up, down = (bank.merged_matrix(n) for n in ("gate_proj", "up_proj", "down_proj"))
        dtype = tensors[key].dtype
        tensors[key] = np.concatenate([gate.transpose(0, 2, 1), up.transpose(0, 2, 1)], axis=1).astype(dtype)
        down_key = key.replace("gate_up_proj", "down_proj")
        tensors[down_key] = down.transpose(0, 2, 1).astype(dtype)
    # safetensors writes an array's memory as it lies: every tensor in C order.
    return {name: np.ascontiguousarray(value) for name, value in tensors.items()}


def export_transformers(causal_lm, path):
    """Writes `config.json`, `model.safetensors` and the tokenizer files of a `Gemma4TextCausalLM`.

    Args:
        causal_lm: a `Gemma4TextCausalLM` (LoRA on dense layers is folded by
            their kernels, on experts here; with its preprocessor for the tokenizer).
        path: the directory.
    """
    from safetensors.numpy import save_file

    get_config, get_weights_map, export_tokenizer = compat.kerashub_gemma4_transformers_export()
    backbone = causal_lm.backbone
    config = transformers_config(backbone, get_config(backbone, include_lm_head=True))
    preprocessor = causal_lm.preprocessor
    if preprocessor is not None:
        tokenizer = preprocessor.tokenizer
        config["bos_token_id"] = tokenizer.start_token_id
        config["eos_token_id"] = tokenizer.end_token_id
        config["pad_token_id"] = tokenizer.pad_token_id
    tensors = transformers_tensors(backbone, get_weights_map(backbone, include_lm_head=True))
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as file:
        json.dump(config, file, indent=2)
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    if preprocessor is not None:
        export_tokenizer(preprocessor.tokenizer, path)
        _drop_added_tokens_table(os.path.join(path, "tokenizer_config.json"))
    return path


def _drop_added_tokens_table(path):
    """Removes keras-hub's `added_tokens_decoder` from `tokenizer_config.json`.

    keras-hub lists Gemma 4 pieces by name and looks each up, so a piece the
    vocabulary lacks (`<img>`) is written with `<unk>`'s id, and the turn
    markers are missing; Transformers then overrides the `tokenizer.json`'s
    added tokens with that table. Without it, `tokenizer.json` says them.
    """
    with open(path, encoding="utf-8") as file:
        config = json.load(file)
    config.pop("added_tokens_decoder", None)
    with open(path, "w", encoding="utf-8") as file:
        json.dump(config, file, indent=2)
