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


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to reach a host fails at once: the tests that use it must work offline.

    Modules whose every test must be offline use it with `pytestmark = pytest.mark.usefixtures("no_network")`.
    """
    def refuse(*args, **kwargs):
        raise OSError("network disabled in tests")

    monkeypatch.setattr("socket.getaddrinfo", refuse)
    monkeypatch.setattr("socket.create_connection", refuse)


@pytest.fixture
def no_model(monkeypatch):
    """Fails the test if a model is built."""
    from keras_tune.models import loader

    def refuse(*args, **kwargs):
        raise AssertionError("a model was built")

    monkeypatch.setattr(loader, "load_causal_lm", refuse)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A private keras_tune cache for one test; returns its GGUF folder."""
    root = tmp_path / "cache"
    monkeypatch.setenv("KERAS_TUNE_CACHE", str(root))
    return root / "gguf"
