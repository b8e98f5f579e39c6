"""PEFT adapters: names and shapes match keras-hub's Transformers export, the update matches the merge."""

import json

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from keras_tune import compat
from keras_tune import config as config_lib
from keras_tune.errors import UserError
from keras_tune.lora import apply_lora, merge_lora
from keras_tune.models.loader import load_causal_lm
from keras_tune.peft import from_peft, load_peft_adapter, read_peft_adapter, save_peft_adapter, to_peft

from helpers import fixed_logits, lora_layers

RANK, ALPHA = 4, 8
ALL_TARGETS = ("query", "key", "value", "attention_output", "ffw_gating", "ffw_gating_2", "ffw_linear")
PREFIX = "base_model.model."


# gemma_tiny reshaped like Gemma 2B (multi-query, heads * head_dim == hidden), the one
# Gemma 1 shape keras-hub 0.32's Transformers exporter writes correctly.
GEMMA_MQA = {"model.arch.num_query_heads": 4, "model.arch.num_key_value_heads": 1}


def _model(preset, targets=None, seed=0, arch=None):
    overrides = {"train.seed": seed, **(arch or {})}
    causal_lm = load_causal_lm(config_lib.load_config(preset, overrides=overrides))
    if targets:
        apply_lora(causal_lm, RANK, targets, alpha=ALPHA)
        rng = np.random.default_rng(1)
        for layer in lora_layers(causal_lm):
            # B starts at zero; random values make every adapter matter.
            for variable in (layer.lora_kernel_a, layer.lora_kernel_b):
                variable.assign(rng.normal(0, 0.05, variable.shape).astype("float32"))
    return causal_lm


def _hf_shapes(hf_config):
    """[out, in] of each HF module, from the exported config.json alone."""
    hidden, head_dim = hf_config["hidden_size"], hf_config["head_dim"]
    heads, kv, ffw = hf_config["num_attention_heads"], hf_config["num_key_value_heads"], hf_config["intermediate_size"]
    return {
        "q_proj": (heads * head_dim, hidden),
        "k_proj": (kv * head_dim, hidden),
        "v_proj": (kv * head_dim, hidden),
        "o_proj": (hidden, heads * head_dim),
        "gate_proj": (ffw, hidden),
        "up_proj": (ffw, hidden),
        "down_proj": (hidden, ffw),
    }


def _pattern(patterns, module, default):
    return next((v for k, v in patterns.items() if module.endswith(f".{k}")), default)


def _importer_layout(update, short, keras_shape):
    """HF [out, in] -> Keras kernel layout, as keras-hub's convert_gemma.py / convert_gemma3.py import it."""
    if short in ("q_proj", "k_proj", "v_proj"):
        return np.transpose(np.reshape(update, (keras_shape[0], keras_shape[2], keras_shape[1])), (0, 2, 1))
    if short == "o_proj":
        return np.transpose(np.reshape(update, (keras_shape[2], keras_shape[0], keras_shape[1])), (1, 2, 0))
    return update.T


@pytest.mark.parametrize(
    "preset,targets,arch",
    [
        ("gemma_tiny", ("query", "value"), None),
        ("gemma3_tiny", ("query", "value"), None),
        ("gemma_tiny", ALL_TARGETS, GEMMA_MQA),
        ("gemma3_tiny", ALL_TARGETS, None),
    ],
)
def test_peft_adapter_matches_the_merged_transformers_export(preset, targets, arch, tmp_path):
    tuned = _model(preset, targets, arch=arch)
    expected_logits = fixed_logits(tuned)
    config = save_peft_adapter(tuned, tmp_path / "peft", base_model_name_or_path="google/some-gemma")
    base_lm = _model(preset, arch=arch)  # same seed: the base weights
    base_lm.export_to_transformers(str(tmp_path / "base"))
    merge_lora(tuned)
    tuned.export_to_transformers(str(tmp_path / "merged"))

    base = load_file(str(tmp_path / "base" / "model.safetensors"))
    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))
    hf_config = json.loads((tmp_path / "merged" / "config.json").read_text())
    shapes = _hf_shapes(hf_config)
    written, arrays = read_peft_adapter(tmp_path / "peft")
    assert written == config
    assert (config["r"], config["lora_alpha"], config["peft_type"], config["task_type"]) == (RANK, ALPHA, "LORA", "CAUSAL_LM")
    assert config["base_model_name_or_path"] == "google/some-gemma"
    fixed = (config["lora_dropout"], config["bias"], config["fan_in_fan_out"], config["inference_mode"])
    assert fixed == (0.0, "none", False, True)
    names = {"query": "q_proj", "key": "k_proj", "value": "v_proj", "attention_output": "o_proj",
             "ffw_gating": "gate_proj", "ffw_gating_2": "up_proj", "ffw_linear": "down_proj"}
    assert sorted(config["target_modules"]) == sorted(names[t] for t in targets)
    # Text-only Gemma 3 exports as Gemma3ForCausalLM: `model.layers.*`, no `language_model`.
    assert all(key.startswith(f"{PREFIX}model.layers.") for key in arrays)
    assert len(arrays) == 2 * len(targets) * hf_config["num_hidden_layers"]

    tuned_layers = {layer.path: layer for layer in lora_layers(tuned)}
    base_layers = {layer.path: layer for layer in compat.sublayers(base_lm.backbone)}
    skipped = []
    for key in sorted(k for k in arrays if k.endswith(".lora_A.weight")):
        module = key[len(PREFIX):-len(".lora_A.weight")]
        block, short = int(module.split(".")[2]), module.rsplit(".", 1)[-1]
        lora_a, lora_b = arrays[key], arrays[key.replace("lora_A", "lora_B")]
        rank = _pattern(config["rank_pattern"], module, config["r"])
        alpha = _pattern(config["alpha_pattern"], module, config["lora_alpha"])
        assert lora_a.shape[0] == lora_b.shape[1] == rank
        update = (alpha / rank) * lora_b @ lora_a
        assert update.shape == shapes[short]
        assert f"{module}.weight" in merged

        # The update, read back the way keras-hub imports HF weights, is the Keras merge's change.
        name = next(t for t, n in names.items() if n == short)
        path = f"decoder_block_{block}/{'attention/' if 'self_attn' in module else ''}{name}"
        keras_change = np.asarray(compat.base_kernel(tuned_layers[path])) - np.asarray(base_layers[path].kernel)
        np.testing.assert_allclose(_importer_layout(update, short, keras_change.shape), keras_change, rtol=1e-4, atol=1e-6)

        # And it is the change in the exported HF weight.
        difference = merged[f"{module}.weight"] - base[f"{module}.weight"]
        if difference.shape != update.shape:
            # keras-hub 0.32's Gemma 1 exporter reshapes q as (-1, hidden) and writes k/v as
            # head 0 only: right for Gemma 2B's shape alone, wrong for stock gemma_tiny.
            assert hf_config["model_type"] == "gemma" and short in ("q_proj", "k_proj", "v_proj")
            skipped.append(module)
            continue
        assert np.abs(difference).max() > 1e-4  # the adapter matters
        np.testing.assert_allclose(update, difference, rtol=1e-4, atol=1e-6)
    assert not skipped or (preset, arch) == ("gemma_tiny", None)

    fresh = _model(preset, arch=arch)
    assert not np.allclose(fixed_logits(fresh), expected_logits, atol=1e-4)
    load_peft_adapter(fresh, tmp_path / "peft")
    np.testing.assert_allclose(fixed_logits(fresh), expected_logits, rtol=1e-6, atol=1e-6)
    assert {layer.name for layer in lora_layers(fresh)} == set(targets)
    assert {float(layer.lora_alpha) for layer in lora_layers(fresh)} == {ALPHA}


@pytest.mark.parametrize("layout,kernel_shape", [("heads_in", (4, 6, 3)), ("heads_out", (4, 3, 6)), ("dense", (6, 5))])
def test_conversion_is_the_keras_update_in_hf_layout(layout, kernel_shape):
    rng = np.random.default_rng(0)
    lora_a = rng.normal(size=kernel_shape[:-1] + (2,)).astype("float32")
    lora_b = rng.normal(size=(2, kernel_shape[-1])).astype("float32")
    keras_update = np.matmul(lora_a, lora_b)  # what EinsumDense adds to its kernel
    # keras-hub's exporter layouts (utils/transformers/export/gemma.py).
    if layout == "heads_in":
        hf_update = keras_update.transpose(1, 0, 2).reshape(kernel_shape[1], -1).T
    elif layout == "heads_out":
        hf_update = keras_update.transpose(2, 0, 1).reshape(kernel_shape[2], -1)
    else:
        hf_update = keras_update.T
    peft_a, peft_b = to_peft(lora_a, lora_b, layout)
    np.testing.assert_allclose(peft_b @ peft_a, hf_update, rtol=1e-5, atol=1e-5)
    back_a, back_b = from_peft(peft_a, peft_b, layout, kernel_shape, 2)
    np.testing.assert_array_equal(back_a, lora_a)
    np.testing.assert_array_equal(back_b, lora_b)


def test_unsupported_models_and_targets_are_refused(tmp_path):
    import keras_hub

    gpt2 = keras_hub.models.GPT2Backbone(
        vocabulary_size=16, num_layers=1, num_heads=1, hidden_dim=8, intermediate_dim=16, max_sequence_length=8
    )
    with pytest.raises(UserError, match="model GPT2Backbone is not supported; expected one of GemmaBackbone, Gemma3Backbone"):
        save_peft_adapter(gpt2, tmp_path / "gpt2")
    with pytest.raises(UserError, match="this model has no LoRA layers"):
        save_peft_adapter(_model("gemma_tiny"), tmp_path / "none")
    embedding = _model("gemma_tiny")
    apply_lora(embedding, RANK, ("token_embedding", "query"))
    with pytest.raises(UserError, match="LoRA on token_embedding has no HF name"):
        save_peft_adapter(embedding, tmp_path / "embedding")
    assert not (tmp_path / "embedding").exists()


def test_adapters_keras_cannot_express_are_refused_whole(tmp_path):
    save_peft_adapter(_model("gemma3_tiny", ("query", "ffw_linear")), tmp_path / "good")
    config, arrays = read_peft_adapter(tmp_path / "good")
    # A generic rank-4 q_proj update (not one B block per head) has no Keras per-head LoRA form.
    bad = dict(arrays)
    key = f"{PREFIX}model.layers.1.self_attn.q_proj.lora_B.weight"
    bad[key] = bad[key] + 0.01
    (tmp_path / "bad").mkdir()
    save_file(bad, str(tmp_path / "bad" / "adapter_model.safetensors"))
    (tmp_path / "bad" / "adapter_config.json").write_text(json.dumps(config))
    fresh = _model("gemma3_tiny")
    before = fixed_logits(fresh)
    with pytest.raises(UserError, match="q_proj: lora_B is not block-diagonal"):
        load_peft_adapter(fresh, tmp_path / "bad")
    assert not lora_layers(fresh)  # nothing applied half-way
    np.testing.assert_array_equal(fixed_logits(fresh), before)

    missing = {k: v for k, v in arrays.items() if ".layers.1.mlp." not in k}
    save_file(missing, str(tmp_path / "bad" / "adapter_model.safetensors"))
    with pytest.raises(UserError, match="block 1 ffw_linear lacks lora_A or lora_B"):
        load_peft_adapter(fresh, tmp_path / "bad")
    with pytest.raises(UserError, match="no adapter_config.json; expected a PEFT adapter directory"):
        read_peft_adapter(tmp_path / "nowhere")
    (tmp_path / "bad" / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "IA3"}))
    with pytest.raises(UserError, match="peft_type 'IA3'; expected 'LORA'"):
        read_peft_adapter(tmp_path / "bad")
    with pytest.raises(UserError, match="rank, alpha, targets"):
        load_peft_adapter(_model("gemma3_tiny", ("query",)), tmp_path / "good")


def test_gemma2_round_trip_uses_gemma_names(tmp_path):
    # keras-hub cannot export Gemma 2 to Transformers (it writes Gemma 1), but HF's
    # Gemma2 modules have Gemma's names and layouts: q/k/v/o_proj, gate/up/down_proj.
    tuned = _model("gemma2_tiny", ALL_TARGETS)
    config = save_peft_adapter(tuned, tmp_path / "peft")
    _, arrays = read_peft_adapter(tmp_path / "peft")
    backbone = tuned.backbone
    shapes = _hf_shapes({
        "hidden_size": backbone.hidden_dim, "head_dim": backbone.head_dim, "num_attention_heads": backbone.num_query_heads,
        "num_key_value_heads": backbone.num_key_value_heads, "intermediate_size": backbone.intermediate_dim // 2,
    })
    assert config["rank_pattern"] == {"q_proj": 8 * RANK, "k_proj": 4 * RANK, "v_proj": 4 * RANK}
    for key in (k for k in arrays if k.endswith(".lora_A.weight")):
        short = key.split(".")[-3]
        assert (arrays[key.replace("lora_A", "lora_B")].shape[0], arrays[key].shape[1]) == shapes[short]
    fresh = _model("gemma2_tiny")
    load_peft_adapter(fresh, tmp_path / "peft")
    np.testing.assert_allclose(fixed_logits(fresh), fixed_logits(tuned), rtol=1e-6, atol=1e-6)
