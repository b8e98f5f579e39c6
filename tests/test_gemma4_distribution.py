"""Gemma 4 over meshes: an experts axis (BxMxE), layouts for dense and MoE models, the same step on every mesh, the planner."""

import jax
import numpy as np
import pytest

from keras_tune import config as config_lib
from keras_tune.distribution import load_layout, parse_mesh, plan_sharding
from keras_tune.errors import UserError
from keras_tune.memory import plan as memory_plan
from keras_tune.models.loader import abstract_model

from helpers import REPO, sgd_step

GIB = 1024**3
REAL = ("gemma4_2b", "gemma4_4b", "gemma4_26b_a4b", "gemma4_31b")


def test_a_mesh_may_name_an_experts_axis():
    assert parse_mesh("1x2x4", 8) == (1, 2, 4) and parse_mesh("2x4", 8) == (2, 4)
    with pytest.raises(UserError, match=r"--mesh 1x2x3 needs 6 devices but 8 were found"):
        parse_mesh("1x2x3", 8)
    with pytest.raises(UserError, match="every axis must be at least 1"):
        parse_mesh("0x2x4", 8)
    config = config_lib.load_config("gemma4_moe_tiny", overrides={"distribution.mesh": "1x2x4"})
    assert config.distribution.mesh == "1x2x4"
    with pytest.raises(UserError, match=r"--mesh '1x2x4x1' is not of the form BxM .* BxMxE"):
        config_lib.load_config("gemma4_moe_tiny", overrides={"distribution.mesh": "1x2x4x1"})


@pytest.mark.parametrize("layout", ["gemma4_tp", "gemma4_fsdp"])
def test_the_26b_splits_experts_over_the_experts_axis_and_their_width_over_model(layout):
    config = config_lib.load_config("gemma4_26b_a4b", overrides={"distribution.mesh": "1x2x4",
                                                                "distribution.layout": layout})
    plan = plan_sharding(config, abstract_model(config).weights, devices=jax.devices())
    assert plan.mesh.axis_names == ("batch", "model", "experts")
    by_path = {p.path: p for p in plan.placements}
    gate = by_path["decoder_block_0/moe_expert_bank/gate_proj"]
    down = by_path["decoder_block_0/moe_expert_bank/down_proj"]
    assert gate.shape == (128, 2816, 704) and gate.axes[0] == "experts" and gate.axes[2] == "model"
    assert down.axes[0] == "experts" and down.axes[1] == "model"
    assert by_path["decoder_block_0/moe_expert_bank/per_expert_scale"].axes == ("experts",)
    # A BxM mesh has no experts axis: the same layout splits only the width.
    flat = config_lib.load_config("gemma4_26b_a4b", overrides={"distribution.mesh": "1x8", "distribution.layout": layout})
    placements = {p.path: p for p in plan_sharding(flat, abstract_model(flat).weights).placements}
    assert placements["decoder_block_0/moe_expert_bank/gate_proj"].axes[0] is None
    assert placements["decoder_block_0/moe_expert_bank/gate_proj"].axes[2] == "model"


def test_one_layout_serves_dense_and_moe_models_its_optional_rules_may_match_nothing():
    layout = load_layout("gemma4_tp", "gemma4")
    assert {rule.optional for rule in layout.rules} == {True, False}
    for preset in ("gemma4_2b", "gemma4_26b_a4b"):
        config = config_lib.load_config(preset, overrides={"distribution.mesh": "1x8"})
        placements = {p.path: p for p in plan_sharding(config, abstract_model(config).weights).placements}
        embedding = placements.get("per_layer_token_embedding/embeddings")
        assert (embedding is not None) == (preset == "gemma4_2b")
        if embedding is not None:  # E2B's 2.3B-parameter table, split by vocabulary rows
            assert embedding.shape == (262144, 35 * 256) and embedding.axes == ("model", None)


def test_one_step_gives_the_same_loss_and_lora_update_on_1x1_1x8_and_an_expert_parallel_mesh():
    """LoRA on attention and on the experts (per-expert factors); experts split 4 ways on 2x1x4."""
    devices = jax.devices()
    targets = ("query", "value", "moe_expert_bank")
    reference_loss, reference = sgd_step("gemma4_moe_tiny", "1x1", devices[:1], targets)
    assert any("moe_expert_bank" in path for path in reference)
    for mesh in ("1x8", "2x1x4"):
        loss, lora = sgd_step("gemma4_moe_tiny", mesh, devices, targets)
        np.testing.assert_allclose(loss, reference_loss, rtol=1e-5, err_msg=mesh)
        for path, value in reference.items():
            np.testing.assert_allclose(lora[path], value, rtol=1e-5, atol=1e-7, err_msg=f"{mesh} {path}")


@pytest.mark.parametrize("preset", REAL)
def test_the_presets_have_transformers_gemma4_parameter_counts(preset):
    """The text model's parameters, counted by Transformers' Gemma4ForCausalLM of the config keras_tune exports."""
    import torch
    import transformers

    from keras_tune import compat
    from keras_tune.models.gemma4.transformers import transformers_config

    backbone = abstract_model(config_lib.load_config(preset), lora=False)
    ours = sum(int(np.prod(v.shape)) for v in backbone.weights if v.trainable)  # not the layer scalars
    get_config = compat.kerashub_gemma4_transformers_export()[0]
    exported = transformers_config(backbone, get_config(backbone, include_lm_head=True))
    hf_config = transformers.AutoConfig.for_model(**{k: v for k, v in exported.items() if k != "architectures"})
    with torch.device("meta"):
        model = transformers.Gemma4ForCausalLM(hf_config)
    assert ours == sum(p.numel() for p in model.parameters())


VERDICTS = [  # (preset, mesh, device memory, fits as the preset stands)
    ("gemma4_31b", "1x8", "16GiB", False),  # v5e-8
    ("gemma4_31b", "1x8", "80GiB", True),  # 8 x H100
    ("gemma4_26b_a4b", "1x8", "16GiB", True),
    ("gemma4_26b_a4b", "1x8", "80GiB", True),
    ("gemma4_2b", "1x1", "16GiB", False),  # one T4
    ("gemma4_4b", "1x1", "24GiB", False),  # one L4
]


@pytest.mark.parametrize("preset, mesh, memory, fits", VERDICTS)
def test_the_planner_gives_the_big_presets_a_verdict(preset, mesh, memory, fits):
    count = int(np.prod([int(n) for n in mesh.split("x")]))
    config = config_lib.load_config(preset, overrides={"distribution.mesh": mesh, "train.device_memory": memory})
    report = memory_plan.plan_memory(config, devices=jax.devices()[:count])
    assert report.fits is fits, report.verdict
    if not fits:  # the change it names is planned and fits
        from keras_tune.memory import suggest

        assert report.suggested, report.verdict
        checked = memory_plan.plan_memory(suggest.variant(config, report.suggested), devices=jax.devices()[:count],
                                          suggest_change=False)
        assert checked.fits, (report.suggestion, checked.verdict)


def test_the_planner_counts_per_layer_embeddings_shared_keys_and_experts():
    from keras_tune.models import families

    family = families.get("gemma4")
    for preset, kinds in (("gemma4_2b", 4), ("gemma4_26b_a4b", 2)):
        config = config_lib.load_config(preset, overrides={"distribution.mesh": "1x1"})
        plan = plan_sharding(config, abstract_model(config).weights, devices=jax.devices()[:1])
        shapes = family.planner_shapes(plan, family.backbone_kwargs(config))
        groups = {(g.head_dim, g.kv_heads, g.ffw, g.experts): count for count, g in shapes.layer_groups}
        assert len(groups) == kinds and sum(groups.values()) == config.model.arch["num_layers"]
    e2b = {(256, 1, 6144, 0): 12, (512, 1, 6144, 0): 3, (256, 0, 12288, 0): 16, (512, 0, 12288, 0): 4}
    config = config_lib.load_config("gemma4_2b", overrides={"distribution.mesh": "1x1"})
    plan = plan_sharding(config, abstract_model(config).weights, devices=jax.devices()[:1])
    shapes = family.planner_shapes(plan, family.backbone_kwargs(config))
    assert {(g.head_dim, g.kv_heads, g.ffw, g.experts): c for c, g in shapes.layer_groups} == e2b
    assert all(g.per_layer_width == 256 for _, g in shapes.layer_groups)


@pytest.mark.parametrize("preset, mesh, low", [("gemma4_tiny", "1x1", 0.8), ("gemma4_moe_tiny", "1x2x4", 0.75)])
def test_the_plan_follows_the_compiled_train_step(preset, mesh, low):
    """Within 20% of XLA's figure (MoE: 25%; on CPU XLA keeps a little more around the experts' shard_map)."""
    import sys

    sys.path.insert(0, str(REPO))
    from benchmarks.memory_planner import compiled_memory

    count = int(np.prod([int(n) for n in mesh.split("x")]))
    devices = jax.devices()[:count]
    config = config_lib.load_config(preset, overrides={"distribution.mesh": mesh})
    planned = memory_plan.plan_memory(config, devices=devices).total
    compiled = compiled_memory(config, devices)["peak"]
    assert low <= planned / compiled <= 1.2, (planned, compiled)
