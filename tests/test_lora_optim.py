"""LoRA toggle, adapters and merging; the optimizer's decay exclusion and schedule."""

import keras
import numpy as np
import pytest

from keras_tune import compat
from keras_tune import config as config_lib
from keras_tune.errors import UserError
from keras_tune.lora import apply_lora, count_parameters, load_adapter, merge_lora, save_adapter, trainable_report
from keras_tune.models.loader import load_causal_lm
from keras_tune.optim import WarmupDecay, build_optimizer

from helpers import fixed_logits


def _model(preset="gemma3_tiny", rank=4, targets=("query", "value"), seed=0):
    config = config_lib.load_config(preset, overrides={"train.seed": seed})
    causal_lm = load_causal_lm(config)
    if rank:
        apply_lora(causal_lm, rank, targets)
    return causal_lm


def _randomize_lora(causal_lm, seed=1):
    rng = np.random.default_rng(seed)
    for variable in causal_lm.backbone.trainable_weights:
        variable.assign(rng.normal(0, 0.05, variable.shape).astype("float32"))


def test_lora_freezes_everything_but_the_adapters():
    causal_lm = _model(targets=("query", "value", "ffw_linear"))
    paths = [v.path for v in causal_lm.backbone.trainable_weights]
    assert paths and all(p.endswith(("lora_kernel_a", "lora_kernel_b")) for p in paths)
    assert {p.split("/")[-2] for p in paths} == {"query", "value", "ffw_linear"}
    report = trainable_report(causal_lm)
    assert report["trainable"] == sum(int(np.prod(v.shape)) for v in causal_lm.backbone.trainable_weights)
    assert report["total"] == count_parameters(causal_lm.backbone.weights) > report["trainable"]
    assert count_parameters([]) == 0


def test_rank_zero_is_full_fine_tuning():
    causal_lm = _model(rank=0)
    apply_lora(causal_lm, 0)
    report = trainable_report(causal_lm)
    assert report["trainable"] == report["total"]


def test_adapter_round_trip_gives_identical_logits(tmp_path):
    trained = _model()
    _randomize_lora(trained)
    path = tmp_path / "adapter.npz"
    save_adapter(trained, str(path), preset="gemma3_tiny")
    fresh = _model(rank=0)  # same seed, so the same base weights
    load_adapter(fresh, str(path), preset="gemma3_tiny")
    np.testing.assert_array_equal(fixed_logits(fresh), fixed_logits(trained))


def test_adapter_mismatches_are_refused_whole(tmp_path):
    trained = _model()
    path = tmp_path / "adapter.npz"
    save_adapter(trained, str(path), preset="gemma3_tiny")
    with pytest.raises(UserError, match="trained on preset gemma3_tiny but the model is gemma_tiny"):
        load_adapter(_model("gemma_tiny", rank=0), str(path), preset="gemma_tiny")
    other_rank = _model(rank=8)
    before = [np.array(v) for v in other_rank.backbone.trainable_weights]
    with pytest.raises(UserError, match="rank 4 does not match the model's 8"):
        load_adapter(other_rank, str(path), preset="gemma3_tiny")
    for variable, value in zip(other_rank.backbone.trainable_weights, before):
        np.testing.assert_array_equal(np.array(variable), value)  # nothing loaded half-way
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(UserError, match="not a keras_tune adapter file"):
        load_adapter(_model(rank=0), str(tmp_path / "junk.npz"))


def test_merged_model_matches_base_plus_lora():
    causal_lm = _model(targets=("query", "value", "attention_output", "ffw_gating"))
    _randomize_lora(causal_lm)
    expected = fixed_logits(causal_lm)
    merge_lora(causal_lm)
    np.testing.assert_allclose(fixed_logits(causal_lm), expected, rtol=1e-5, atol=1e-5)
    # The adapters no longer contribute: changing A leaves the output alone.
    for layer in compat.sublayers(causal_lm.backbone):
        if getattr(layer, "lora_enabled", False):
            layer.lora_kernel_a.assign(np.ones(layer.lora_kernel_a.shape, "float32"))
    np.testing.assert_allclose(fixed_logits(causal_lm), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_weight_decay_skips_norm_scales_and_biases(name):
    config = config_lib.load_config(
        "gemma_tiny",
        overrides={"optimizer.name": name, "optimizer.weight_decay": 0.1, "optimizer.learning_rate": 0.1, "optimizer.clipnorm": 0.0},
    )
    optimizer = build_optimizer(config.optimizer, total_steps=10)
    scale = keras.Variable(np.full((4,), 2.0, "float32"), name="scale")
    bias = keras.Variable(np.full((4,), 2.0, "float32"), name="bias")
    kernel = keras.Variable(np.full((4, 4), 2.0, "float32"), name="kernel")
    embeddings = keras.Variable(np.full((8, 4), 2.0, "float32"), name="embeddings")
    variables = [scale, bias, kernel, embeddings]
    optimizer.apply_gradients([(np.zeros(v.shape, "float32"), v) for v in variables])
    np.testing.assert_array_equal(np.array(scale), 2.0)
    np.testing.assert_array_equal(np.array(bias), 2.0)
    assert np.all(np.array(kernel) < 2.0) and np.all(np.array(embeddings) < 2.0)


def test_embeddings_can_be_excluded_from_decay():
    config = config_lib.load_config(
        "gemma_tiny", overrides={"optimizer.weight_decay": 0.1, "optimizer.exclude_embeddings_from_decay": True}
    )
    optimizer = build_optimizer(config.optimizer, total_steps=10)
    embeddings = keras.Variable(np.full((8, 4), 2.0, "float32"), name="embeddings")
    optimizer.apply_gradients([(np.zeros((8, 4), "float32"), embeddings)])
    np.testing.assert_array_equal(np.array(embeddings), 2.0)


def test_warmup_then_cosine_and_linear():
    cosine = WarmupDecay(1.0, total_steps=110, warmup_steps=10, decay="cosine")
    linear = WarmupDecay(1.0, total_steps=110, warmup_steps=10, decay="linear")
    values = [float(cosine(step)) for step in (0, 4, 9, 10, 60, 110)]
    np.testing.assert_allclose(values, [0.1, 0.5, 1.0, 1.0, 0.5, 0.0], atol=1e-6)
    np.testing.assert_allclose([float(linear(s)) for s in (10, 35, 110)], [1.0, 0.75, 0.0], atol=1e-6)


def test_clipping_and_accumulation_reach_keras():
    config = config_lib.load_config("gemma_tiny", overrides={"optimizer.clipnorm": 0.5, "optimizer.accumulation_steps": 4})
    optimizer = build_optimizer(config.optimizer, total_steps=10)
    assert optimizer.global_clipnorm == 0.5
    assert optimizer.gradient_accumulation_steps == 4
