"""Training-time callbacks and Orbax checkpoints on a small keras model and synthetic batches (no data module)."""

import math
import os

import keras
import numpy as np
import pytest

from keras_tune import callbacks as cb
from keras_tune import compat, flops, rundir
from keras_tune.memory import devices
from keras_tune.metrics import TokenCount
from keras_tune.checkpoint import CheckpointStore, check_identity, state_variables
from keras_tune.errors import UserError

VOCAB, LENGTH, BATCH = 11, 6, 4


def _model(learning_rate=0.0):
    """A token-level model shaped like a CausalLM's outputs: (batch, length) ids -> (batch, length, vocab) logits."""
    compat.set_random_seed(0)  # keras.utils' tf.random.set_seed would drop the session tokenizer's TF resources
    inputs = keras.Input((LENGTH,), dtype="int32")
    hidden = keras.layers.Embedding(VOCAB, 8, name="embedding")(inputs)
    logits = keras.layers.Dense(VOCAB, name="dense")(hidden)
    model = keras.Model(inputs, logits)
    model.compile(
        optimizer=keras.optimizers.AdamW(learning_rate=learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="mean_with_sample_weight"),
        metrics=[TokenCount(0), TokenCount(0, non_pad=True)],
    )
    return model


def _batches(count, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(1, VOCAB, size=(count, BATCH, LENGTH)).astype("int32")
    y = rng.integers(1, VOCAB, size=(count, BATCH, LENGTH)).astype("int32")
    y[:, :, -2:] = 0  # padding: target 0, no weight
    w = (y != 0).astype("float32")
    return x, y, w


def _dataset(x, y, w):
    import tensorflow as tf

    return tf.data.Dataset.from_tensor_slices((x, y, w))


@pytest.mark.parametrize(
    "kind, tflops",
    [
        ("TPU v2", 22.5),
        ("TPU v3", 61.5),
        ("TPU v4", 275.0),
        ("TPU v5 lite", 197.0),
        ("TPU v5e", 197.0),
        ("TPU v5", 459.0),
        ("TPU v6 lite", 918.0),
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA A100-SXM4-40GB", 312.0),
        ("NVIDIA L4", 121.0),
        ("NVIDIA L40S", 362.0),
        ("Tesla T4", 65.0),
        ("cpu", 0.0),
    ],
)
def test_peak_flops_table(kind, tflops):
    assert devices.peak_tflops_per_device(kind) == tflops


def test_flops_per_token_counts_weight_gradients_only_where_weights_train():
    full = flops.flops_per_token(1000, 1000, num_layers=2, attention_width=16, seq_len=8)
    lora = flops.flops_per_token(1000, 10, num_layers=2, attention_width=16, seq_len=8)
    attention = 12 * 2 * 8 * 16
    assert full == 6 * 1000 + attention  # the usual 6N for full fine-tuning
    assert lora == 4 * 1000 + 2 * 10 + attention


def test_token_counts_all_and_non_pad():
    y = np.array([[5, 3, 0, 0], [1, 0, 0, 0]])
    every, non_pad = TokenCount(0), TokenCount(0, non_pad=True)
    every.update_state(y)
    non_pad.update_state(y)
    assert float(every.result()) == 8.0 and float(non_pad.result()) == 3.0


def test_step_losses_throughput_and_metrics_csv(tmp_path):
    model = _model(learning_rate=0.0)  # weights stay put: each step's loss can be recomputed
    x, y, w = _batches(6)
    progress = cb.Progress(total_steps=5)
    callbacks = [
        cb.StepTracker(progress),
        cb.Throughput(flops_per_token=100.0, peak_flops=1e6),
        cb.MetricsLog(progress, str(tmp_path), learning_rate=cb.learning_rate_at(0.5)),
    ]
    model.fit(_dataset(x, y, w).repeat(), steps_per_epoch=2, epochs=3, callbacks=callbacks, verbose=0, shuffle=False)
    assert progress.step == 5  # stopped at total_steps inside the third epoch
    rows = rundir.read_rows(str(tmp_path / "metrics.csv"))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5]
    for i, row in enumerate(rows):
        expected = model.evaluate(x[i], y[i], sample_weight=w[i], verbose=0, return_dict=True)["loss"]
        assert row["loss"] == pytest.approx(expected, rel=1e-5)
        assert row["learning_rate"] == 0.5
        assert row["tokens_per_s"] > row["non_pad_tokens_per_s"] > 0
        assert row["non_pad_tokens_per_s"] / row["tokens_per_s"] == pytest.approx(4 / 6, rel=1e-4)
        assert row["mfu"] == pytest.approx(row["tokens_per_s"] * 100.0 / 1e6, rel=1e-4)
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(tmp_path / "tensorboard"))


class _FakeStore:
    def __init__(self):
        self.saved = []

    def save(self, step, model, metadata):
        self.saved.append(step)

    def wait(self):
        pass


def test_nan_loss_stops_and_writes_no_checkpoint(tmp_path):
    model = _model(learning_rate=0.0)
    x, y, w = _batches(4)
    w[2, 0, 0] = np.nan  # the third step's loss is NaN
    progress, store = cb.Progress(total_steps=4), _FakeStore()
    lines = []
    callbacks = [cb.StepTracker(progress, log=lines.append), cb.Checkpoints(progress, store, every=1)]
    model.fit(_dataset(x, y, w), steps_per_epoch=1, epochs=4, callbacks=callbacks, verbose=0, shuffle=False)
    assert progress.nonfinite_step == 3 and progress.step == 3
    assert store.saved == [1, 2]
    assert "nan at step 3" in lines[0]


def test_truncating_logs_after_a_checkpoint(tmp_path):
    path = str(tmp_path / "metrics.csv")
    rundir.append_rows(path, [{"step": s, "loss": 1.0 / s} for s in range(1, 7)])
    rundir.truncate_rows(path, 4)
    assert [int(r["step"]) for r in rundir.read_rows(path)] == [1, 2, 3, 4]
    samples = tmp_path / "samples.txt"
    samples.write_text("=== step 0 (before training) ===\n>>> a\nb\n\n=== step 4 (training) ===\n>>> a\nc\n\n"
                       "=== step 6 (training) ===\n>>> a\nd\n\n")
    rundir.truncate_samples(str(samples), 4)
    assert "step 4" in samples.read_text() and "step 6" not in samples.read_text()


def test_plot_losses_writes_a_png(tmp_path):
    path = str(tmp_path / "metrics.csv")
    rundir.append_rows(path, [{"step": 0, "val_loss": 3.0}] + [{"step": s, "loss": 3.0 - s / 50} for s in range(1, 60)]
                   + [{"step": 60, "loss": 1.8, "val_loss": 2.0}])
    png = rundir.plot_losses(path, str(tmp_path / "loss.png"), title="t")
    with open(png, "rb") as file:
        assert file.read(8) == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------
# Orbax checkpoints.

IDENTITY = {"preset": "p", "lora_rank": 4, "layout": "gemma_tp"}


def _trained(steps=3):
    model = _model(learning_rate=0.1)
    x, y, w = _batches(steps)
    model.fit(_dataset(x, y, w), epochs=1, verbose=0, shuffle=False)
    return model


def _state(model):
    return {name: np.array(v.numpy()) for name, v in state_variables(model).items()}


def test_checkpoint_round_trip_holds_weights_and_optimizer_state(tmp_path):
    model = _trained()
    names = set(state_variables(model))
    assert {"optimizer/iteration", "trainable/dense/kernel"} <= names
    store = CheckpointStore(str(tmp_path), keep=2, asynchronous=False)
    store.save(3, model, {"identity": IDENTITY})
    saved = _state(model)
    fresh = _model(learning_rate=0.1)
    fresh.optimizer.build(fresh.trainable_variables)
    meta = CheckpointStore(str(tmp_path)).restore_latest(fresh, IDENTITY)
    assert meta["step"] == 3 and meta["data_position"] == 3
    for name, value in _state(fresh).items():
        np.testing.assert_array_equal(value, saved[name], err_msg=name)


def test_keep_checkpoints_deletes_the_oldest(tmp_path):
    model = _trained()
    store = CheckpointStore(str(tmp_path), keep=2, asynchronous=False)
    for step in (1, 2, 3):
        store.save(step, model, {"identity": IDENTITY})
    store.close()
    assert CheckpointStore(str(tmp_path)).steps() == [2, 3]


def _data_files(directory):
    """The array-data files of an Orbax item (OCDBT keeps them in `d/` folders)."""
    return [os.path.join(root, name) for root, _, names in os.walk(directory) for name in names
            if os.path.basename(root) == "d"]


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_corrupt_newest_checkpoint_falls_back_with_a_warning(tmp_path, damage):
    model = _trained()
    store = CheckpointStore(str(tmp_path), keep=3, asynchronous=False)
    store.save(1, model, {"identity": IDENTITY})
    older = _state(model)
    model.fit(_dataset(*_batches(1, seed=5)), epochs=1, verbose=0, shuffle=False)
    store.save(2, model, {"identity": IDENTITY})
    store.close()
    for victim in _data_files(os.path.join(store.directory, "2", "state")):
        data = open(victim, "rb").read()
        with open(victim, "wb") as file:
            if damage == "truncate":
                file.write(data[: len(data) // 3])
            else:
                file.write(bytes(b ^ 0x5A if i >= len(data) // 2 else b for i, b in enumerate(data)))
    warnings = []
    fresh = _model(learning_rate=0.1)
    fresh.optimizer.build(fresh.trainable_variables)
    meta = CheckpointStore(str(tmp_path), warn=warnings.append).restore_latest(fresh, IDENTITY)
    assert meta["step"] == 1
    assert len(warnings) == 1 and "checkpoints/2 is unusable" in warnings[0]
    assert os.listdir(tmp_path / "checkpoints-corrupt")
    for name, value in _state(fresh).items():
        np.testing.assert_array_equal(value, older[name], err_msg=name)


def test_checkpoint_of_another_model_is_refused_naming_both_sides(tmp_path):
    model = _trained()
    store = CheckpointStore(str(tmp_path), asynchronous=False)
    store.save(1, model, {"identity": IDENTITY})
    store.close()
    other = dict(IDENTITY, preset="q", lora_rank=8)
    with pytest.raises(UserError) as error:
        CheckpointStore(str(tmp_path)).restore_latest(model, other)
    message = str(error.value)
    assert "preset p, lora.rank 4" in message and "preset q, lora.rank 8" in message
    with pytest.raises(UserError, match="layout gemma_fsdp"):
        check_identity(IDENTITY, dict(IDENTITY, layout="gemma_fsdp"), "here")


def test_flops_of_a_tiny_gemma_are_plausible():
    from keras_tune import config as config_lib
    from keras_tune.models.loader import abstract_model

    backbone = abstract_model(config_lib.load_config("gemma_tiny"))
    per_token = flops.model_flops_per_token(backbone, 64)
    total = sum(math.prod(v.shape) for v in backbone.weights)
    assert 4 * total < per_token < 7 * total + 12 * 2 * 64 * 128
