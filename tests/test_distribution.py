"""Meshes, layouts and sharding on 8 simulated CPU devices."""

import json

import jax
import keras
import keras_hub
import numpy as np
import pytest

from keras_tune import config as config_lib
from keras_tune.distribution import load_layout, parse_mesh, plan_sharding, resolve_layout
from keras_tune.errors import UserError
from keras_tune.training import run
from keras_tune.models.loader import abstract_model

from helpers import assert_planned_specs, lora_model_under_plan, one_step, unmatched_layout

# Gemma 4's keras-hub metadata counts the vision and audio encoders too, rounded; the text models'
# exact counts are checked against Transformers' Gemma4ForCausalLM in test_gemma4_distribution.
REAL_PRESETS = [
    name for name in config_lib.list_presets()
    if config_lib.load_config(name).model.source == "kaggle" and config_lib.load_config(name).model.family != "gemma4"
]


def test_eight_devices_are_simulated():
    assert len(jax.devices()) == 8


@pytest.mark.parametrize("text, expected", [("1x8", (1, 8)), ("2x4", (2, 4)), ("8x1", (8, 1)), ("auto", (1, 8))])
def test_parse_mesh(text, expected):
    assert parse_mesh(text, 8) == expected


def test_mesh_of_the_wrong_size_lists_the_devices_found():
    with pytest.raises(UserError, match=r"--mesh 3x3 needs 9 devices but 8 were found"):
        parse_mesh("3x3", 8)


@pytest.mark.parametrize("name", REAL_PRESETS)
def test_real_presets_match_keras_hub_parameter_counts(name):
    config = config_lib.load_config(name)
    backbone = abstract_model(config, lora=False)
    classes = [keras_hub.models.GemmaBackbone, keras_hub.models.Gemma3Backbone]
    params = next(c.presets[name]["metadata"]["params"] for c in classes if name in c.presets)
    assert sum(int(np.prod(v.shape)) for v in backbone.weights) == params


@pytest.mark.parametrize("mesh", ["1x8", "2x4"])
@pytest.mark.parametrize("name", config_lib.list_presets())
def test_dry_run_every_preset(name, mesh, capsys):
    config = config_lib.load_config(name, overrides={"distribution.mesh": mesh, "run.dry_run": True})
    result = run(config)
    out = capsys.readouterr().out
    assert "replicated per device" in out
    assert "per device: base weights" in out
    sizes = result.plan.mesh_sizes
    for placement in result.plan.placements:
        for dim, axis in zip(placement.shape, placement.axes):
            assert axis is None or dim % sizes[axis] == 0


def test_gemma_7b_lora_count_matches_the_tutorial():
    config = config_lib.load_config("gemma_7b_en", overrides={"lora.rank": 4})
    backbone = abstract_model(config)
    trainable = sum(int(np.prod(v.shape)) for v in backbone.trainable_weights)
    total = sum(int(np.prod(v.shape)) for v in backbone.weights)
    assert trainable == 11_067_392  # "about 11 million" in the Keras distributed tuning tutorial
    assert 8.5e9 < total < 8.6e9


def test_single_kv_head_falls_back_to_sharding_hidden():
    config = config_lib.load_config("gemma3_270m", overrides={"distribution.mesh": "1x8"})
    plan = plan_sharding(config, abstract_model(config).weights)
    by_path = {p.path: p for p in plan.placements}
    key = by_path["decoder_block_0/attention/key/kernel"]
    assert key.shape == (1, 640, 256) and key.axes == (None, "model", None) and "fallback" in key.note
    query = by_path["decoder_block_0/attention/query/kernel"]  # 4 heads do not divide 8
    assert query.axes == (None, "model", None)
    assert by_path["token_embedding/embeddings"].axes == ("model", None)
    assert "fallback" in plan.table()


def test_layout_rule_matching_nothing_is_named(tmp_path):
    config = config_lib.load_config("gemma_tiny", overrides={"distribution.layout": unmatched_layout(tmp_path)})
    with pytest.raises(UserError, match=r"rule 'decoder_block\.\*mlp/kernel' matches no variable"):
        plan_sharding(config, abstract_model(config).weights)


def test_dimension_that_cannot_divide_names_rule_variable_shape_axis(tmp_path):
    path = tmp_path / "odd.json"
    path.write_text(json.dumps({"family": "gemma", "rules": [{"pattern": "final_normalization/scale", "axes": ["model"]}]}))

    class Variable:  # a 60-wide scale cannot split 8 ways
        path, shape, dtype, trainable = "final_normalization/scale", (60,), "float32", False

    with pytest.raises(UserError, match=r"rule 'final_normalization/scale' cannot shard final_normalization/scale of shape \(60,\).*'model' of size 8"):
        resolve_layout(load_layout(str(path), "gemma"), [Variable()], {"batch": 1, "model": 8})


@pytest.mark.parametrize("preset, layout", [("gemma_tiny", "gemma_tp"), ("gemma2_tiny", "gemma2_fsdp"), ("gemma3_tiny", "gemma3_tp")])
def test_variables_carry_the_layout_partition_spec(preset, layout):
    config, plan, causal_lm = lora_model_under_plan(preset, {"distribution.mesh": "2x4", "distribution.layout": layout})
    checked = sum(any(axes) for _, axes in assert_planned_specs(causal_lm, plan))
    assert checked >= 5 * config.model.arch.num_layers


@pytest.mark.parametrize("preset", ["gemma_tiny", "gemma3_tiny"])
def test_one_step_gives_the_same_loss_and_lora_update_on_every_mesh(preset):
    devices = keras.distribution.list_devices()
    reference_loss, reference_lora, before, after = one_step(preset, "1x1", devices[:1])
    # LoRA training leaves the base weights bit-identical.
    assert before.keys() == after.keys()
    for path in before:
        np.testing.assert_array_equal(before[path], after[path], err_msg=path)
    assert all(path.endswith(("lora_kernel_a", "lora_kernel_b")) for path in reference_lora)
    for mesh in ("1x8", "2x4", "4x2", "8x1"):
        loss, lora, _, _ = one_step(preset, mesh, devices)
        np.testing.assert_allclose(loss, reference_loss, rtol=1e-5, err_msg=mesh)
        for path, value in reference_lora.items():
            # Adam divides by sqrt(v) + eps, so a near-zero gradient's reduction-order
            # noise reaches ~1e-7 absolute; 1e-6 is 0.1% of one step at lr 1e-3.
            np.testing.assert_allclose(lora[path], value, rtol=1e-5, atol=1e-6, err_msg=f"{mesh} {path}")
