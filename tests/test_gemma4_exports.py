"""Gemma 4 out and in: Transformers and PEFT (read back by Transformers and PEFT), keras-hub presets, text-only loading."""

import json

import numpy as np
import pytest

from helpers import gemma4_causal_lm, jitted_logits, random_lora, transformers_logits

pytestmark = pytest.mark.usefixtures("no_network")


def _tokens(seed=0, length=36):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, 1024, size=(2, length)).astype("int32")
    tokens[:, 0] = 2
    return tokens


@pytest.mark.parametrize("preset, targets", [
    ("gemma4_tiny", ("query", "value", "ffw_gating", "per_layer_input_gate", "per_layer_model_projection")),
    ("gemma4_moe_tiny", ("query", "attention_output", "ffw_linear", "moe_expert_bank")),
])
def test_the_transformers_export_of_a_lora_tuned_model_loads_in_transformers_with_equal_logits(tmp_path, preset,
                                                                                               targets):
    from keras_tune.lora import merge_lora
    from keras_tune.models.exports.transformers import export_transformers

    _, causal_lm = gemma4_causal_lm(preset)
    random_lora(causal_lm, targets)
    tokens = _tokens()
    tuned = jitted_logits(causal_lm, {"token_ids": tokens, "padding_mask": np.ones_like(tokens)})
    merge_lora(causal_lm)
    directory = tmp_path / "hf"
    export_transformers(causal_lm, str(directory))
    config = json.loads((directory / "config.json").read_text())
    assert config["architectures"] == ["Gemma4ForCausalLM"] and config["model_type"] == "gemma4_text"
    assert config["attention_k_eq_v"] is (preset == "gemma4_moe_tiny")
    np.testing.assert_allclose(transformers_logits(str(directory), tokens), tuned, atol=1e-4, rtol=1e-4)
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(directory))
    text = "<|turn>user\ndef f(x):<turn|>\n"
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == [
        int(i) for i in np.asarray(causal_lm.preprocessor.tokenizer(text))]


@pytest.mark.parametrize("preset, targets", [
    ("gemma4_tiny", ("query", "key", "value", "ffw_gating_2", "per_layer_input_gate", "per_layer_up_proj")),
    ("gemma4_moe_tiny", ("query", "attention_output", "ffw_linear")),
])
def test_the_peft_adapter_applies_unmerged_on_the_transformers_base(tmp_path, preset, targets):
    """Keys and values only where a block owns them (the last E2B-like blocks share an earlier one's)."""
    from keras_tune.models.exports.transformers import export_transformers
    from keras_tune.peft import load_peft_adapter, save_peft_adapter

    _, causal_lm = gemma4_causal_lm(preset)
    base = tmp_path / "base"
    export_transformers(causal_lm, str(base))
    random_lora(causal_lm, targets)
    tokens = _tokens(seed=2)
    tuned = jitted_logits(causal_lm, {"token_ids": tokens, "padding_mask": np.ones_like(tokens)})
    config = save_peft_adapter(causal_lm, str(tmp_path / "peft"))
    assert set(config["target_modules"]) >= {"q_proj"}
    np.testing.assert_allclose(transformers_logits(str(base), tokens, adapter=str(tmp_path / "peft")), tuned,
                               atol=1e-4, rtol=1e-4)
    # And back: the PEFT adapter loads into a fresh model with the same update.
    _, fresh = gemma4_causal_lm(preset)
    load_peft_adapter(fresh, str(tmp_path / "peft"))
    np.testing.assert_allclose(jitted_logits(fresh, {"token_ids": tokens, "padding_mask": np.ones_like(tokens)}),
                               tuned, atol=1e-5)


def test_expert_lora_has_no_peft_name_and_is_refused_in_one_line(tmp_path):
    from keras_tune.errors import UserError
    from keras_tune.lora import apply_lora
    from keras_tune.peft import save_peft_adapter

    _, causal_lm = gemma4_causal_lm("gemma4_moe_tiny")
    apply_lora(causal_lm, 4, ("query", "moe_expert_bank"))
    with pytest.raises(UserError) as error:
        save_peft_adapter(causal_lm, str(tmp_path / "peft"))
    assert "moe_expert_bank" in str(error.value) and "\n" not in str(error.value)
    assert not (tmp_path / "peft").exists()


@pytest.mark.parametrize("shard_gb", [10, 0.0004])
def test_a_keras_hub_preset_with_a_vision_encoder_loads_text_only(tmp_path, shard_gb):
    """A preset as Kaggle's hold them (keras-hub's whole Gemma4Backbone): the encoder's weights stay in the file.

    In one `model.weights.h5`, or (as the large presets are) in shards with a `model.weights.json` index.
    """
    import keras_hub

    from keras_tune import config as config_lib
    from keras_tune.models import families
    from keras_tune.models.loader import load_causal_lm

    _, causal_lm = gemma4_causal_lm("gemma4_tiny")
    arguments = {k: v for k, v in causal_lm.backbone.get_config().items()
                 if k not in ("name", "trainable", "dtype", "router_aux_loss_weight", "vision_encoder",
                              "audio_encoder")}  # keras-hub's get_config lists the (absent) encoders too
    vision = keras_hub.models.Gemma4VisionEncoder(
        image_size=32, patch_size=4, num_heads=2, hidden_dim=16, num_layers=1, intermediate_dim=32, head_dim=8,
        num_key_value_heads=2, output_dim=arguments["hidden_dim"], pool_size=2, dtype="float32")
    whole = keras_hub.models.Gemma4Backbone(**{**arguments, "image_size": 32}, vision_encoder=vision, dtype="float32")
    values = {v.path: np.asarray(v) for v in causal_lm.backbone.weights}
    for variable in whole.weights:
        if variable.path in values:
            variable.assign(values[variable.path])
    assert len(whole.weights) > len(values)  # the encoder's
    task = keras_hub.models.Gemma4CausalLM(backbone=whole, preprocessor=causal_lm.preprocessor)
    task.save_to_preset(str(tmp_path / "preset"), max_shard_size=shard_gb)
    assert (tmp_path / "preset" / "model.weights.json").is_file() is (shard_gb < 1)

    config = config_lib.load_config("gemma4_tiny", overrides={
        "model.source": "local", "model.handle": str(tmp_path / "preset")})
    assert families.of_preset_dir(str(tmp_path / "preset")).name == "gemma4"
    loaded = load_causal_lm(config)
    assert loaded.backbone.vision_encoder is None
    assert {v.path: v.shape for v in loaded.backbone.weights} == {v.path: v.shape for v in causal_lm.backbone.weights}
    for variable in loaded.backbone.weights:
        np.testing.assert_array_equal(np.asarray(variable), values[variable.path], err_msg=variable.path)


def test_a_transformers_checkpoint_with_a_vision_tower_loads_text_only_with_equal_logits(tmp_path):
    """A Gemma4ForConditionalGeneration directory: keras-hub's converter reads the language model's tensors only."""
    import torch
    import transformers

    from keras_tune import config as config_lib
    from keras_tune.models.exports.hf_tokenizer import write_tokenizer_json
    from keras_tune.models.exports.transformers import export_transformers
    from keras_tune.models.loader import load_causal_lm

    _, causal_lm = gemma4_causal_lm("gemma4_moe_tiny")
    text_only = tmp_path / "text"
    export_transformers(causal_lm, str(text_only))
    text_config = json.loads((text_only / "config.json").read_text())
    text_config.pop("architectures")
    config = transformers.Gemma4Config(
        text_config=text_config,
        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "num_key_value_heads": 2, "head_dim": 8, "patch_size": 4, "pooling_kernel_size": 2},
    )
    torch.manual_seed(0)
    whole = transformers.Gemma4ForConditionalGeneration(config).eval()
    text_model = transformers.AutoModelForCausalLM.from_pretrained(str(text_only), dtype=torch.float32)
    missing = whole.model.language_model.load_state_dict(
        {k.removeprefix("model."): v for k, v in text_model.state_dict().items() if k.startswith("model.")}, strict=False)
    assert not missing.missing_keys
    directory = tmp_path / "whole"
    whole.save_pretrained(str(directory))
    write_tokenizer_json(causal_lm.preprocessor.tokenizer, str(directory))
    saved = json.loads((directory / "config.json").read_text())
    assert saved["model_type"] == "gemma4" and "vision_config" in saved

    run_config = config_lib.load_config("gemma4_moe_tiny", overrides={
        "model.source": "local", "model.handle": str(directory)})
    loaded = load_causal_lm(run_config)
    tokens = _tokens(seed=4)
    with torch.no_grad():
        expected = whole(input_ids=torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    got = jitted_logits(loaded, {"token_ids": tokens, "padding_mask": np.ones_like(tokens)})
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)


def test_the_merged_keras_preset_reloads_as_the_same_model(tmp_path):
    from keras_tune import config as config_lib
    from keras_tune.models.exports.keras_preset import merge_and_export
    from keras_tune.models.loader import load_causal_lm

    _, causal_lm = gemma4_causal_lm("gemma4_moe_tiny")
    random_lora(causal_lm, ("query", "moe_expert_bank"))
    tokens = _tokens(seed=5)
    tuned = jitted_logits(causal_lm, {"token_ids": tokens, "padding_mask": np.ones_like(tokens)})
    result = merge_and_export(causal_lm, str(tmp_path / "merged"), transformers=False, log=lambda line: None)
    config = config_lib.load_config("gemma4_moe_tiny", overrides={"model.source": "local",
                                                                   "model.handle": result["preset"]})
    loaded = load_causal_lm(config)
    np.testing.assert_allclose(jitted_logits(loaded, {"token_ids": tokens, "padding_mask": np.ones_like(tokens)}),
                               tuned, atol=1e-5)


@pytest.mark.parametrize("k_eq_v", [True, False])
def test_released_and_transformers_saved_configs_give_the_same_global_layers(k_eq_v):
    """Released configs say global_head_dim and num_global_key_value_heads; Transformers 5 saves per_layer_config."""
    import transformers

    from keras_tune.models.gemma4.source import transformers_arguments

    released = dict(
        model_type="gemma4_text", vocab_size=1024, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        hidden_size=64, intermediate_size=96, head_dim=16, global_head_dim=32, num_global_key_value_heads=1,
        attention_k_eq_v=k_eq_v, sliding_window=16, hidden_size_per_layer_input=0,
        layer_types=["sliding_attention", "full_attention"] * 2,
    )
    saved = transformers.Gemma4TextConfig(**{k: v for k, v in released.items() if k != "model_type"}).to_dict()
    assert "per_layer_config" in saved and "global_head_dim" not in saved
    from_released, from_saved = transformers_arguments(released), transformers_arguments(saved)
    assert from_released["global_head_dim"] == from_saved["global_head_dim"] == 32
    # Without k = v (E2B sets the count anyway) the global layers keep their own keys and values.
    expected = 1 if k_eq_v else None
    assert from_released["num_global_key_value_heads"] == from_saved["num_global_key_value_heads"] == expected
