"""The memory planner: sizes, the device table, verdicts and suggestions, and the plan against XLA."""

import sys
from pathlib import Path

import jax
import pytest

from keras_tune import config as config_lib
from keras_tune.distribution import format_bytes
from keras_tune.memory import activations, devices, suggest
from keras_tune.memory import plan as memory_plan
from keras_tune.models import families
from keras_tune.errors import UserError

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

GIB = 1024**3


def _config(preset, **overrides):
    return config_lib.load_config(preset, overrides=overrides)


@pytest.mark.parametrize("text, expected", [
    ("16GiB", 16 * GIB), ("16 GiB", 16 * GIB), ("80GB", 80 * 10**9), ("24G", 24 * GIB),
    ("1.5TiB", int(1.5 * 2**40)), ("512mib", 512 * 2**20),
])
def test_sizes_parse_binary_and_decimal_units(text, expected):
    assert devices.parse_memory_size(text) == expected


@pytest.mark.parametrize("text", ["16", "sixteen GiB", "16 GiBs", "-4GiB", "", "1KiB"])
def test_a_bad_size_is_one_line_saying_what_was_received_and_expected(text):
    with pytest.raises(UserError) as error:
        devices.parse_memory_size(text)
    message = str(error.value)
    assert "\n" not in message and f"'{text}'" in message and "16GiB" in message


def test_a_bad_device_memory_field_fails_when_planned():
    config = _config("gemma_tiny", **{"distribution.mesh": "1x1", "train.device_memory": "lots"})
    with pytest.raises(UserError, match="--device-memory 'lots'"):
        memory_plan.plan_memory(config, devices=jax.devices()[:1])


@pytest.mark.parametrize("kind, gib", [
    ("TPU v3", 16), ("TPU v4", 32), ("TPU v5 lite", 16), ("TPU v5e", 16), ("TPU v5p", 95), ("TPU v6 lite", 32),
    ("NVIDIA A100-SXM4-40GB", 40), ("NVIDIA A100-SXM4-80GB", 80), ("NVIDIA H100 80GB HBM3", 80),
    ("NVIDIA H200", 141), ("NVIDIA L4", 24), ("Tesla T4", 16), ("NVIDIA L40S", 48),
])
def test_the_device_table(kind, gib):
    assert devices.known_device_memory(kind) == gib * GIB


def test_cpu_devices_give_no_verdict_and_say_why():
    report = memory_plan.plan_memory(_config("gemma_tiny", **{"distribution.mesh": "1x8"}))
    assert report.device_memory is None and report.fits is None
    assert "CPU" in report.verdict and "--device-memory" in report.verdict
    assert report.total > 0


def test_gemma_7b_lora_fits_on_a_16gib_v5e_8_with_its_figures():
    config = _config("gemma_7b_en", **{"lora.rank": 4, "distribution.mesh": "1x8", "train.device_memory": "16GiB"})
    report = memory_plan.plan_memory(config)
    assert report.fits is True and report.verdict.startswith("fits (") and "GiB free" in report.verdict
    # 8.5B bfloat16 parameters over 8 devices, the LoRA state a few MiB.
    assert 1.9 * GIB < report.base_weights < 2.1 * GIB
    assert report.trainable_weights < 64 * 2**20 and report.optimizer_state == 2 * report.trainable_weights
    assert report.activations_remat < report.activations_no_remat
    text = memory_plan.format_memory_report(report)
    for row in ("base weights", "trainable weights", "optimizer state", "gradients", "activations",
                "logits/loss buffer", "total", "fits ("):
        assert row in text
    activations = next(line for line in text.splitlines() if line.strip().startswith("activations"))
    assert activations.endswith(f"without remat (with --remat: {format_bytes(report.activations_remat)})")


def test_gemma2_27b_full_fine_tuning_does_not_fit_and_the_suggestion_does():
    config = _config("gemma2_27b_en", **{"lora.rank": 0, "distribution.mesh": "1x8", "train.device_memory": "16GiB"})
    report = memory_plan.plan_memory(config)
    assert report.fits is False and report.verdict.startswith("does not fit: needs ")
    assert report.suggested and report.suggestion.startswith("try --")
    checked = memory_plan.plan_memory(suggest.variant(config, report.suggested), suggest_change=False)
    assert checked.fits is True, (report.suggestion, checked.verdict)
    assert suggest.as_flags(report.suggested) in report.suggestion


def test_suggestions_follow_the_fixed_order():
    config = _config("gemma_7b_en", **{"distribution.mesh": "2x4", "lora.rank": 0})
    changes = suggest.candidate_changes(config, 8)
    assert changes[0] == {"distribution.mesh": "1x8"}  # more model parallelism first
    assert {"distribution.layout": "gemma_fsdp"} in changes
    order = [next(i for i, c in enumerate(changes) if key in c)
             for key in ("distribution.layout", "lora.rank", "data.batch_size", "train.remat", "train.quantize")]
    assert order == sorted(order)
    assert suggest.as_flags({"lora.rank": 4, "train.remat": True}) == "--lora-rank 4 --remat"
    assert suggest.as_flags({"train.loss": "sparse"}) == "--set train.loss=sparse"


def test_the_levers_lower_what_they_should():
    base = {"distribution.mesh": "1x8", "lora.rank": 4, "train.loss": "full"}
    plain = memory_plan.plan_memory(_config("gemma_2b_en", **base))
    remat = memory_plan.plan_memory(_config("gemma_2b_en", **base, **{"train.remat": True}))
    sparse = memory_plan.plan_memory(_config("gemma_2b_en", **{**base, "train.loss": "sparse", "train.loss_chunk_tokens": 256}))
    int8 = memory_plan.plan_memory(_config("gemma_2b_en", **base, **{"train.quantize": "int8"}))
    int4 = memory_plan.plan_memory(_config("gemma_2b_en", **base, **{"train.quantize": "int4"}))
    assert remat.activations < plain.activations and remat.activations == plain.activations_remat
    assert sparse.logits < plain.logits
    assert int4.base_weights < int8.base_weights < 0.6 * plain.base_weights
    sgd = memory_plan.plan_memory(_config("gemma_2b_en", **base, **{"optimizer.name": "sgd"}))
    assert sgd.optimizer_state == 0 and plain.optimizer_state == 2 * plain.trainable_weights


def test_a_family_outside_the_planner_is_refused_in_one_line(monkeypatch):
    recurrent = type(families.get("recurrentgemma"))
    monkeypatch.setattr(recurrent, "planner_shapes", families.Family.planner_shapes)  # a family with no planner view
    with pytest.raises(UserError, match="memory planner covers gemma, gemma2, gemma3, gemma4 models, not recurrentgemma"):
        memory_plan.plan_memory(_config("recurrentgemma_tiny", **{"distribution.mesh": "1x1"}), devices=jax.devices()[:1])


def test_recurrentgemma_9b_lora_on_1x8_gets_a_verdict_with_its_figures():
    config = _config("recurrentgemma_9b", **{"distribution.mesh": "1x8", "train.device_memory": "16GiB"})
    report = memory_plan.plan_memory(config)
    assert report.fits is True and report.verdict.startswith("fits (")
    # 8.58B bfloat16 parameters over 8 devices; LoRA on query, value, linear_x, linear_y a few MiB.
    assert 1.9 * GIB < report.base_weights < 2.1 * GIB
    assert report.trainable_weights < 16 * 2**20 and report.optimizer_state == 2 * report.trainable_weights
    assert report.activations_remat < report.activations_no_remat / 4
    tight = memory_plan.plan_memory(suggest.variant(config, {"train.device_memory": "4GiB"}))
    assert tight.fits is False and tight.suggested, tight.verdict


def test_recurrentgemma_counts_26_recurrent_and_12_attention_blocks_of_the_9b():
    from keras_tune.distribution import plan_sharding
    from keras_tune.models.loader import abstract_model

    config = _config("recurrentgemma_9b", **{"distribution.mesh": "1x8"})
    plan = plan_sharding(config, abstract_model(config).weights, devices=jax.devices())
    family = families.get(config.model.family)
    shapes = family.planner_shapes(plan, family.backbone_kwargs(config))
    assert (shapes.layers, shapes.recurrent_layers) == (38, 26)  # recurrent, recurrent, attention
    assert (shapes.lru, shapes.ffw, shapes.heads, shapes.kv_heads) == (4096 // 8, 12288 // 8, 16 // 8, 1)
    assert {"linear_x", "linear_y", "query", "value"} <= shapes.trained
    # A recurrent block is linear in the sequence length; an attention block keeps T x T scores.
    recurrent = [activations.recurrent_block_activations(shapes, 1, seq, 2) for seq in (2048, 4096)]
    attention = [activations.block_activations(shapes, 1, seq, 2) for seq in (2048, 4096)]
    assert 1.9 < recurrent[1] / recurrent[0] < 2.1
    assert attention[1] / attention[0] > 2.5


def test_the_dry_run_prints_the_recurrentgemma_9b_verdict(capsys):
    from keras_tune import fit

    argv = ["--preset", "recurrentgemma_9b", "--mesh", "1x8", "--simulate-devices", "8", "--dry-run",
            "--device-memory", "16GiB"]
    assert fit.main(argv) == 0
    out = capsys.readouterr().out
    assert "memory per device: mesh 1x8 (8 devices), layout recurrentgemma_tp" in out
    assert "device memory 16.0 GiB (--device-memory 16GiB): fits (" in out


# ---------------------------------------------------------------------------
# The plan against what XLA's compiled train step needs (CPU, float32).


def _planned_and_compiled(preset, mesh, **overrides):
    from benchmarks.memory_planner import compiled_memory

    batch, model = (int(n) for n in mesh.split("x"))
    devices = jax.devices()[: batch * model]
    config = _config(preset, **{"distribution.mesh": mesh, **overrides})
    return memory_plan.plan_memory(config, devices=devices).total, compiled_memory(config, devices)["peak"]


@pytest.mark.parametrize("mesh", ["1x1", "1x8", "2x4"])
@pytest.mark.parametrize("preset", ["gemma_tiny", "gemma2_tiny", "gemma3_tiny", "recurrentgemma_tiny"])
def test_the_plan_is_within_20_percent_of_the_compiled_train_step(preset, mesh):
    planned, compiled = _planned_and_compiled(preset, mesh)
    assert 0.8 <= planned / compiled <= 1.2, (planned, compiled)


@pytest.mark.parametrize("preset, mesh, overrides", [
    ("gemma_tiny", "1x1", {"lora.rank": 0}),
    ("gemma_tiny", "1x1", {"train.loss": "full"}),
    ("gemma_tiny", "2x4", {"distribution.layout": "gemma_fsdp"}),
    ("gemma3_tiny", "1x1", {"train.quantize": "int8"}),
    ("gemma3_tiny", "1x1", {"data.seq_len": 256, "data.batch_size": 2}),
    ("recurrentgemma_tiny", "1x1", {"lora.rank": 0}),
    ("recurrentgemma_tiny", "1x1", {"train.loss": "full"}),
    ("recurrentgemma_tiny", "2x4", {"distribution.layout": "recurrentgemma_fsdp"}),
    ("recurrentgemma_tiny", "1x1", {"data.seq_len": 256, "data.batch_size": 2}),
])
def test_the_plan_follows_xla_through_the_levers(preset, mesh, overrides):
    planned, compiled = _planned_and_compiled(preset, mesh, **overrides)
    assert 0.8 <= planned / compiled <= 1.2, (planned, compiled)


@pytest.mark.slow  # loads the real weights and compiles the 270M train step (~30 s)
def test_the_real_270m_on_one_device_is_within_20_percent():
    planned, compiled = _planned_and_compiled("gemma3_270m_offline", "1x1")
    assert 0.8 <= planned / compiled <= 1.2, (planned, compiled)
