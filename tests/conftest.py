"""Every test runs on 8 simulated CPU devices; set before anything imports JAX."""

import os
import re

os.environ["XLA_FLAGS"] = (
    re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
    + " --xla_force_host_platform_device_count=8"
).strip()
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["KERAS_BACKEND"] = "jax"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_keras_state():
    """Each test starts with no global distribution and float32 policy."""
    import keras

    yield
    keras.distribution.set_distribution(None)
    keras.config.set_dtype_policy("float32")


@pytest.fixture(scope="session")
def tok():
    """The tiny presets' offline Gemma 3 tokenizer (built once; it is immutable)."""
    from keras_tune.models.tiny import tiny_tokenizer

    return tiny_tokenizer("gemma3")
