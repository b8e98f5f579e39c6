"""Memory levers: rematerialized decoder blocks and a quantized frozen base (QLoRA-style)."""

import jax
import numpy as np
import pytest

from keras_tune import config as config_lib
from keras_tune import training
from keras_tune.models.loader import build_model

from helpers import loss_and_grads, loss_batch, write_corpus


def _compiled_temp_bytes(model, x, y, weight):
    trainable = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]

    def loss_fn(values):
        import keras

        logits, _ = model.stateless_call(values, non_trainable, x, training=True)
        return (keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True) * weight).sum()

    compiled = jax.jit(jax.grad(loss_fn)).lower(trainable).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def _loss_grads_and_temp_bytes(preset, **overrides):
    """A LoRA model's loss, gradients and compiled temporaries on a 2 x 256 all-token batch, adapters random."""
    config = config_lib.load_config(preset, overrides={
        "distribution.mesh": "1x1", "lora.targets": "query,value,ffw_linear", **overrides})
    model = build_model(config, lora=True, devices=jax.devices()[:1]).causal_lm
    rng = np.random.default_rng(0)
    for variable in model.trainable_variables:
        variable.assign(rng.normal(0, 0.02, variable.shape).astype("float32"))
    x, y, weight = loss_batch(model.backbone.vocabulary_size, "all", batch=2, length=256)
    loss, grads = loss_and_grads(model, x, y, weight)
    return model, loss, grads, _compiled_temp_bytes(model, x, y, weight)


def test_remat_gives_the_same_gradients_and_keeps_less_for_the_backward_pass():
    _, loss, grads, plain_bytes = _loss_grads_and_temp_bytes("gemma_tiny", **{"train.keep_activations": "all"})
    _, remat_loss, remat_grads, remat_bytes = _loss_grads_and_temp_bytes(
        "gemma_tiny", **{"train.keep_activations": "all", "train.remat": True})
    np.testing.assert_allclose(remat_loss, loss, rtol=1e-6)
    for a, b in zip(grads, remat_grads):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)
    assert remat_bytes < plain_bytes, (remat_bytes, plain_bytes)


@pytest.mark.parametrize("preset", ["gemma_tiny", "gemma3_tiny"])
def test_keeping_only_matmul_outputs_gives_the_same_gradients_and_keeps_less(preset):
    """`train.keep_activations=matmuls` recomputes a block's elementwise ops and attention core: the same numbers."""
    results = {}
    for keep in ("all", "matmuls"):
        model, *results[keep] = _loss_grads_and_temp_bytes(preset, **{"train.keep_activations": keep})
        wrapped = [getattr(block.call, "keras_tune_selective_remat", False) for block in model.backbone.transformer_layers]
        assert wrapped == [keep == "matmuls"] * len(wrapped)
    (loss, grads, all_bytes), (kept_loss, kept_grads, kept_bytes) = results["all"], results["matmuls"]
    np.testing.assert_allclose(kept_loss, loss, rtol=1e-6)
    for a, b in zip(grads, kept_grads):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)
    assert kept_bytes < 0.9 * all_bytes, (kept_bytes, all_bytes)


def test_keep_only_matmul_outputs_wraps_each_block_once():
    from keras_tune.models.remat import keep_matmul_outputs_only

    config = config_lib.load_config("gemma3_tiny", overrides={"distribution.mesh": "1x1", "train.keep_activations": "matmuls"})
    backbone = build_model(config, lora=True, devices=jax.devices()[:1]).causal_lm.backbone
    assert keep_matmul_outputs_only(backbone) == 0  # build_model already did
    for overrides in ({}, {"train.keep_activations": "matmuls", "train.remat": True}):  # the default; whole-block remat
        config = config_lib.load_config("gemma3_tiny", overrides={"distribution.mesh": "1x1", **overrides})
        backbone = build_model(config, lora=True, devices=jax.devices()[:1]).causal_lm.backbone
        assert keep_matmul_outputs_only(backbone) == len(backbone.transformer_layers), overrides


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_a_quantized_base_still_learns_and_its_adapter_loads_on_the_float_model(mode, tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt")
    config = config_lib.load_config("gemma3_tiny", overrides={
        "data.name": "text", "data.path": corpus, "train.steps": 8, "train.eval_every": 8,
        "optimizer.learning_rate": 1e-2, "train.quantize": mode, "train.output_dir": str(tmp_path / mode),
    })
    result = training.run(config)
    backbone = result.causal_lm.backbone
    assert any(str(v.dtype) == "int8" for v in backbone.weights)  # the base really is quantized
    assert all(str(v.dtype) == "float32" for v in backbone.trainable_weights)  # LoRA is not
    from keras_tune.rundir import read_rows

    rows = read_rows(str(tmp_path / mode / "metrics.csv"))
    before, after = rows[0]["val_loss"], rows[-1]["val_loss"]
    assert after < before - 0.05, (before, after)

    float_config = config_lib.load_config("gemma3_tiny", overrides={"model.adapter": str(tmp_path / mode / "adapter.npz")})
    float_model = build_model(float_config).causal_lm
    ids = np.array([[2, 17, 29, 5, 40, 41, 8, 9]], dtype="int32")
    inputs = {"token_ids": ids, "padding_mask": np.ones_like(ids)}
    tuned, quantized = np.asarray(float_model(inputs)), np.asarray(result.causal_lm(inputs))
    base = np.asarray(build_model(config_lib.load_config("gemma3_tiny")).causal_lm(inputs))
    # The adapter moves the float model as it moved the quantized one: closer to it than the base is.
    assert np.abs(tuned - quantized).mean() < np.abs(base - quantized).mean()
