"""The memory planner: sizes, the device table, verdicts and suggestions, and the plan against XLA."""

import sys
from pathlib import Path

import jax
import pytest

from keras_tune import config as config_lib
from keras_tune import memory
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
    assert memory.parse_memory_size(text) == expected


@pytest.mark.parametrize("text", ["16", "sixteen GiB", "16 GiBs", "-4GiB", "", "1KiB"])
def test_a_bad_size_is_one_line_saying_what_was_received_and_expected(text):
    with pytest.raises(UserError) as error:
        memory.parse_memory_size(text)
    message = str(error.value)
    assert "\n" not in message and f"'{text}'" in message and "16GiB" in message


def test_a_bad_device_memory_field_fails_when_planned():
    config = _config("gemma_tiny", **{"distribution.mesh": "1x1", "train.device_memory": "lots"})
    with pytest.raises(UserError, match="--device-memory 'lots'"):
        memory.plan_memory(config, devices=jax.devices()[:1])


@pytest.mark.parametrize("kind, gib", [
    ("TPU v3", 16), ("TPU v4", 32), ("TPU v5 lite", 16), ("TPU v5e", 16), ("TPU v5p", 95), ("TPU v6 lite", 32),
    ("NVIDIA A100-SXM4-40GB", 40), ("NVIDIA A100-SXM4-80GB", 80), ("NVIDIA H100 80GB HBM3", 80),
    ("NVIDIA H200", 141), ("NVIDIA L4", 24), ("Tesla T4", 16), ("NVIDIA L40S", 48),
])
def test_the_device_table(kind, gib):
    assert memory.known_device_memory(kind) == gib * GIB


def test_cpu_devices_give_no_verdict_and_say_why():
    report = memory.plan_memory(_config("gemma_tiny", **{"distribution.mesh": "1x8"}))
    assert report.device_memory is None and report.fits is None
    assert "CPU" in report.verdict and "--device-memory" in report.verdict
    assert report.total > 0


def test_gemma_7b_lora_fits_on_a_16gib_v5e_8_with_its_figures():
    config = _config("gemma_7b_en", **{"lora.rank": 4, "distribution.mesh": "1x8", "train.device_memory": "16GiB"})
    report = memory.plan_memory(config)
    assert report.fits is True and report.verdict.startswith("fits (") and "GiB free" in report.verdict
    # 8.5B bfloat16 parameters over 8 devices, the LoRA state a few MiB.
    assert 1.9 * GIB < report.base_weights < 2.1 * GIB
    assert report.trainable_weights < 64 * 2**20 and report.optimizer_state == 2 * report.trainable_weights
    assert report.activations_remat < report.activations_no_remat
    text = memory.format_memory_report(report)
    for row in ("base weights", "trainable weights", "optimizer state", "gradients", "activations",
                "logits/loss buffer", "total", "fits ("):
        assert row in text


def test_gemma2_27b_full_fine_tuning_does_not_fit_and_the_suggestion_does():
    config = _config("gemma2_27b_en", **{"lora.rank": 0, "distribution.mesh": "1x8", "train.device_memory": "16GiB"})
    report = memory.plan_memory(config)
    assert report.fits is False and report.verdict.startswith("does not fit: needs ")
    assert report.suggested and report.suggestion.startswith("try --")
    checked = memory.plan_memory(memory.variant(config, report.suggested), suggest_change=False)
    assert checked.fits is True, (report.suggestion, checked.verdict)
    assert memory.as_flags(report.suggested) in report.suggestion


def test_suggestions_follow_the_fixed_order():
    config = _config("gemma_7b_en", **{"distribution.mesh": "2x4", "lora.rank": 0})
    changes = memory.candidate_changes(config, 8)
    assert changes[0] == {"distribution.mesh": "1x8"}  # more model parallelism first
    assert {"distribution.layout": "gemma_fsdp"} in changes
    order = [next(i for i, c in enumerate(changes) if key in c)
             for key in ("distribution.layout", "lora.rank", "data.batch_size", "train.remat", "train.quantize")]
    assert order == sorted(order)
    assert memory.as_flags({"lora.rank": 4, "train.remat": True}) == "--lora-rank 4 --remat"
    assert memory.as_flags({"train.loss": "sparse"}) == "--set train.loss=sparse"


def test_the_levers_lower_what_they_should():
    base = {"distribution.mesh": "1x8", "lora.rank": 4, "train.loss": "full"}
    plain = memory.plan_memory(_config("gemma_2b_en", **base))
    remat = memory.plan_memory(_config("gemma_2b_en", **base, **{"train.remat": True}))
    sparse = memory.plan_memory(_config("gemma_2b_en", **{**base, "train.loss": "sparse", "train.loss_chunk_tokens": 256}))
    int8 = memory.plan_memory(_config("gemma_2b_en", **base, **{"train.quantize": "int8"}))
    int4 = memory.plan_memory(_config("gemma_2b_en", **base, **{"train.quantize": "int4"}))
    assert remat.activations < plain.activations and remat.activations == plain.activations_remat
    assert sparse.logits < plain.logits
    assert int4.base_weights < int8.base_weights < 0.6 * plain.base_weights
    sgd = memory.plan_memory(_config("gemma_2b_en", **base, **{"optimizer.name": "sgd"}))
    assert sgd.optimizer_state == 0 and plain.optimizer_state == 2 * plain.trainable_weights


def test_other_families_are_refused_in_one_line():
    if "recurrentgemma" not in config_lib.FAMILIES:
        pytest.skip("no RecurrentGemma presets here")
    with pytest.raises(UserError, match="memory planner covers gemma"):
        memory.plan_memory(_config("recurrentgemma_tiny", **{"distribution.mesh": "1x1"}), devices=jax.devices()[:1])


# ---------------------------------------------------------------------------
# The plan against what XLA's compiled train step needs (CPU, float32).


def _planned_and_compiled(preset, mesh, **overrides):
    from benchmarks.memory_planner import compiled_memory

    batch, model = (int(n) for n in mesh.split("x"))
    devices = jax.devices()[: batch * model]
    config = _config(preset, **{"distribution.mesh": mesh, **overrides})
    return memory.plan_memory(config, devices=devices).total, compiled_memory(config, devices)["peak"]


@pytest.mark.parametrize("mesh", ["1x1", "1x8", "2x4"])
@pytest.mark.parametrize("preset", ["gemma_tiny", "gemma2_tiny", "gemma3_tiny"])
def test_the_plan_is_within_20_percent_of_the_compiled_train_step(preset, mesh):
    planned, compiled = _planned_and_compiled(preset, mesh)
    assert 0.8 <= planned / compiled <= 1.2, (planned, compiled)


@pytest.mark.parametrize("preset, mesh, overrides", [
    ("gemma_tiny", "1x1", {"lora.rank": 0}),
    ("gemma_tiny", "1x1", {"train.loss": "full"}),
    ("gemma_tiny", "2x4", {"distribution.layout": "gemma_fsdp"}),
    ("gemma3_tiny", "1x1", {"train.quantize": "int8"}),
    ("gemma3_tiny", "1x1", {"data.seq_len": 256, "data.batch_size": 2}),
])
def test_the_plan_follows_xla_through_the_levers(preset, mesh, overrides):
    planned, compiled = _planned_and_compiled(preset, mesh, **overrides)
    assert 0.8 <= planned / compiled <= 1.2, (planned, compiled)


@pytest.mark.slow  # loads the real weights and compiles the 270M train step (~30 s)
def test_the_real_270m_on_one_device_is_within_20_percent():
    planned, compiled = _planned_and_compiled("gemma3_270m_offline", "1x1")
    assert 0.8 <= planned / compiled <= 1.2, (planned, compiled)
