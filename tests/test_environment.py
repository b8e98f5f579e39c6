"""Quiet start and TensorFlow kept off accelerators (keras_tune.environment)."""

import json
import os
import re
import subprocess
import sys
import types

import pytest

from keras_tune import environment

# Variables the test harness (conftest) or a user's shell may set that change what a
# plain `python -m keras_tune.fit` prints or where it runs.
_HARNESS_VARIABLES = ("TF_", "JAX_", "XLA_", "KERAS_BACKEND", "CUDA_VISIBLE_DEVICES")
_NATIVE_INFO = re.compile(r"^I\d{4} [\d:.]+ +\d+ \S+:\d+\] ")


@pytest.mark.slow
def test_fit_starts_quietly(tmp_path):
    """A fresh CLI run (tokenizer trained from scratch) prints no CUDA or native INFO line."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_HARNESS_VARIABLES)}
    env["KERAS_TUNE_CACHE"] = str(tmp_path / "cache")
    result = subprocess.run(
        [sys.executable, "-m", "keras_tune.fit", "--preset", "gemma_tiny", "--steps", "2",
         "--output-dir", str(tmp_path / "run")],
        env=env, capture_output=True, text=True, timeout=600,
    )
    lines = (result.stdout + result.stderr).splitlines()
    assert result.returncode == 0, "\n".join(lines[-40:])
    noisy = [
        line for line in lines
        if "CUDA" in line or "LOG(INFO)" in line or "absl::InitializeLog" in line or _NATIVE_INFO.match(line)
    ]
    assert noisy == [], "\n".join(noisy)
    assert any(line.startswith("run directory:") for line in lines)


def test_make_datasets_keeps_tensorflow_on_cpu(tmp_path, tok, monkeypatch):
    import ml_collections
    import tensorflow as tf

    from keras_tune.data import make_datasets

    calls = []
    real = environment.keep_tensorflow_off_accelerators

    def spy(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(environment, "keep_tensorflow_off_accelerators", spy)
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(
        json.dumps({"prompt": f"Count to {n}:\n", "response": " ".join(map(str, range(n)))}) + "\n"
        for n in range(1, 5)
    ), encoding="utf-8")
    config = ml_collections.ConfigDict(dict(
        name="text", path=str(path), data_dir="", max_examples=0, seq_len=24, batch_size=2,
        validation_fraction=0.0, max_validation_examples=0, text_field="text", prompt_field="prompt",
        response_field="response", messages_field="messages", mtnt_pair="en-fr",
        prompt_template="{source}", batching="pad", key_tokens=(), key_token_alpha=0.0, shuffle_buffer=0,
    ))
    bundle = make_datasets(config, tok, seed=0, log=None)
    next(iter(bundle.train))
    assert calls == [()]
    assert tf.config.get_visible_devices("GPU") == []
    assert {device.device_type for device in tf.config.get_visible_devices()} == {"CPU"}
    assert os.environ["TF_ENABLED_DEVICE_TYPES"] == "CPU"


def _device(kind, index=0):
    return types.SimpleNamespace(name=f"/physical_device:{kind}:{index}", device_type=kind)


class _FakeConfig:
    """tf.config over a fixed device list; `initialized` makes visibility final."""

    def __init__(self, physical, initialized=False):
        self.physical, self.visible, self.initialized = list(physical), list(physical), initialized
        self.calls = []

    def list_physical_devices(self, device_type=None):
        return [d for d in self.physical if device_type in (None, d.device_type)]

    def get_visible_devices(self, device_type=None):
        return [d for d in self.visible if device_type in (None, d.device_type)]

    def set_visible_devices(self, devices, device_type=None):
        self.calls.append((list(devices), device_type))
        if self.initialized:
            raise RuntimeError("Visible devices cannot be modified after being initialized")
        kept = [] if device_type is None else [d for d in self.visible if d.device_type != device_type]
        self.visible = kept + list(devices)


def test_keep_tensorflow_off_accelerators_hides_gpus_and_tpus():
    cpu = _device("CPU")
    config = _FakeConfig([cpu, _device("GPU"), _device("GPU", 1), _device("TPU")])
    assert environment.keep_tensorflow_off_accelerators(types.SimpleNamespace(config=config)) == ["CPU"]
    assert config.visible == [cpu] and config.get_visible_devices("GPU") == []
    assert config.calls == [([cpu], None)]


def test_keep_tensorflow_off_accelerators_leaves_a_cpu_only_tensorflow_alone():
    config = _FakeConfig([_device("CPU")], initialized=True)
    assert environment.keep_tensorflow_off_accelerators(types.SimpleNamespace(config=config)) == ["CPU"]
    assert config.calls == []


def test_keep_tensorflow_off_accelerators_warns_once_tensorflow_runs_on_a_gpu():
    config = _FakeConfig([_device("CPU"), _device("GPU")], initialized=True)
    with pytest.warns(RuntimeWarning, match=r"GPU:0 visible.*Import keras_tune before"):
        kinds = environment.keep_tensorflow_off_accelerators(types.SimpleNamespace(config=config))
    assert kinds == ["CPU", "GPU"]


NOISE = [
    b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n",
    b"I0000 00:00:1795447167.745920    5752 cudart_stub.cc:31] Could not find cuda drivers on your machine,"
    b" GPU will not be used.\n",
    b"I0000 00:00:1795447167.744401    5752 port.cc:153] oneDNN custom operations are on.\n",
    b"normalizer.cc(51) LOG(INFO) precompiled_charsmap is empty. use identity normalization.\n",
]
KEPT = [
    b"E0000 00:00:1795447170.956884    5752 some_op.cc:52] a real error\n",
    b"W1123 11:35:39.123456    5752 dataset.cc:9] a real warning\n",
    b"trainer_interface.cc(12) LOG(WARNING) a sentencepiece warning\n",
    b"a Python traceback line\n",
]


@pytest.mark.parametrize("level, dropped", [("1", NOISE), ("3", NOISE + KEPT[:3]), ("0", [])])
def test_quiet_native_logs_drops_only_lines_below_the_level(capfd, monkeypatch, level, dropped):
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", level)
    with environment.quiet_native_logs():
        for line in NOISE + KEPT:
            os.write(2, line)
    expected = b"".join(line for line in NOISE + KEPT if line not in dropped)
    assert capfd.readouterr().err == expected.decode()


def test_quiet_start_only_sets_defaults_and_leaves_accelerators_to_jax(monkeypatch):
    for name in environment.QUIET_ENVIRONMENT:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "0")  # a user who wants every log line
    before = dict(os.environ)
    environment.quiet_start()
    added = {k: v for k, v in os.environ.items() if k not in before}
    assert added == {"TF_ENABLED_DEVICE_TYPES": "CPU", "TF_ENABLE_ONEDNN_OPTS": "0"}
    assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == "0"


def test_keras_hub_tokenizers_build_quietly(capfd):
    import keras_hub

    from keras_tune.models.tiny import tiny_tokenizer

    assert getattr(keras_hub.tokenizers.SentencePieceTokenizer.set_proto, "_keras_tune_quiet", False)
    capfd.readouterr()
    tokenizer = tiny_tokenizer("gemma")
    assert int(tokenizer.token_to_id("<bos>")) == 2
    assert "LOG(INFO)" not in capfd.readouterr().err


def test_a_keras_on_another_backend_is_refused_in_one_line(tmp_path):
    """Keras imported on TensorFlow (Kaggle's default) fails before any model is built, in one line."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_HARNESS_VARIABLES)}
    env["KERAS_BACKEND"] = "tensorflow"
    result = subprocess.run(
        [sys.executable, "-m", "keras_tune.fit", "--preset", "gemma_tiny", "--dry-run"],
        env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: Keras runs on the 'tensorflow' backend; keras_tune needs 'jax': set KERAS_BACKEND=jax "
        "before Keras is first imported (or import keras_tune first) and restart the process"
    ], result.stderr


def test_require_jax_backend_passes_on_jax():
    environment.require_jax_backend()  # the suite runs on JAX: no error


def test_freed_heap_is_released_after_every_compile_by_one_listener(monkeypatch):
    import jax
    import jax.numpy as jnp

    calls, compiles = [], []
    monkeypatch.setattr(environment, "release_freed_memory", lambda: calls.append(1) or True)

    def count(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(1)

    jax.monitoring.register_event_duration_secs_listener(count)
    try:
        environment.release_memory_after_compiles()
        assert environment.release_memory_after_compiles() is False  # registered once per process
        values = jnp.arange(7.0)
        jax.jit(lambda x: jnp.sin(x) * 3.25 + x.size)(values).block_until_ready()  # a new program
        jax.jit(lambda x: jnp.cos(x) * 1.5 - x.size)(values).block_until_ready()
    finally:
        jax.monitoring.unregister_event_duration_listener(count)
    assert len(compiles) >= 2 and len(calls) == len(compiles)  # once per compile, not twice


def test_the_memory_optimized_cpu_schedule_is_added_once_and_a_users_choice_kept(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    assert environment.prefer_memory_optimized_cpu_schedule()
    assert os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=8 " + environment.MEMORY_SCHEDULER_FLAG
    assert not environment.prefer_memory_optimized_cpu_schedule()  # already there
    assert os.environ["XLA_FLAGS"].count("xla_cpu_scheduler_type") == 1
    own = "--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_DEFAULT"
    monkeypatch.setenv("XLA_FLAGS", own)
    assert not environment.prefer_memory_optimized_cpu_schedule()
    assert os.environ["XLA_FLAGS"] == own
    # An unknown XLA flag aborts the process: a jaxlib before the flag gets none.
    monkeypatch.delenv("XLA_FLAGS")
    monkeypatch.setattr(environment, "MEMORY_SCHEDULER_JAXLIB", (99, 0))
    assert not environment.prefer_memory_optimized_cpu_schedule()
    assert "XLA_FLAGS" not in os.environ


def test_train_steps_compile_with_the_memory_optimized_schedule():
    """`import keras_tune` (before JAX started) made XLA schedule for memory: an int8 base's step keeps fewer temporaries.

    The backbone's step (no head): XLA's default schedule converts every int8 kernel the backward pass needs at the start.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np

    from keras_tune import config as config_lib
    from keras_tune.models.loader import build_model

    assert environment.MEMORY_SCHEDULER_FLAG in os.environ["XLA_FLAGS"]
    config = config_lib.load_config("gemma3_tiny", overrides={"distribution.mesh": "1x1", "train.quantize": "int8"})
    backbone = build_model(config, lora=True, devices=jax.devices()[:1]).causal_lm.backbone
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(0, 100, (2, 64)), jnp.int32)
    x = {"token_ids": ids, "padding_mask": jnp.ones((2, 64), jnp.int32)}

    backbone_non_trainable = [v.value for v in backbone.non_trainable_variables]

    def loss(trainable):
        return backbone.stateless_call(trainable, backbone_non_trainable, x, training=True)[0].mean()

    lowered = jax.jit(jax.value_and_grad(loss)).lower([v.value for v in backbone.trainable_variables])

    def temporaries(**options):
        return lowered.compile(compiler_options=options).memory_analysis().temp_size_in_bytes

    assert environment.cpu_schedule_options(None) == {}
    ours, default = temporaries(), temporaries(**environment.cpu_schedule_options("CPU_SCHEDULER_TYPE_DEFAULT"))
    assert ours == temporaries(xla_cpu_scheduler_type="CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED")
    assert ours < default
