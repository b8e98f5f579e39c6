"""keras-hub's own `.lora.h5` save/load works on a model tuned by keras_tune's `apply_lora`."""

import numpy as np
import pytest

from keras_tune import config as config_lib
from keras_tune.lora import apply_lora
from keras_tune.models.loader import load_causal_lm

from helpers import fixed_logits, lora_layers

RANK, ALPHA, TARGETS = 4, 8.0, ("query", "value")


def _model(preset):
    # The same seed gives the same base weights, so only the adapters can differ.
    return load_causal_lm(config_lib.load_config(preset, overrides={"train.seed": 0}))


@pytest.mark.parametrize("preset", ["gemma_tiny", "gemma3_tiny"])
def test_kerashub_lora_h5_round_trip(preset, tmp_path):
    trained = _model(preset)
    apply_lora(trained, RANK, TARGETS, alpha=ALPHA)
    rng = np.random.default_rng(1)
    for layer in lora_layers(trained):
        # B starts at zero; random values make the adapter change the output.
        for variable in (layer.lora_kernel_a, layer.lora_kernel_b):
            variable.assign(rng.normal(0, 0.05, variable.shape).astype("float32"))
    path = str(tmp_path / "x.lora.h5")
    trained.backbone.save_lora_weights(path)

    fresh = _model(preset)
    apply_lora(fresh, RANK, TARGETS, alpha=ALPHA)
    assert not np.allclose(fixed_logits(fresh), fixed_logits(trained), atol=1e-4)
    fresh.backbone.load_lora_weights(path)
    np.testing.assert_allclose(fixed_logits(fresh), fixed_logits(trained), rtol=1e-6, atol=1e-6)

    # keras-hub's own enable_lora numbers the same layers: the file lands on the same paths.
    kerashub = _model(preset)
    kerashub.backbone.enable_lora(RANK, target_layer_names=list(TARGETS))
    kerashub.backbone.load_lora_weights(path)
    expected = {v.path: np.asarray(v) for layer in lora_layers(trained) for v in (layer.lora_kernel_a, layer.lora_kernel_b)}
    loaded = {v.path: np.asarray(v) for layer in lora_layers(kerashub) for v in (layer.lora_kernel_a, layer.lora_kernel_b)}
    assert sorted(loaded) == sorted(expected)
    for key, value in expected.items():
        np.testing.assert_array_equal(loaded[key], value)
