"""The seeds' settings, reproduced as they say: steps count optimizer updates, the logged learning rate is
the applied one, SGD without AdamW's decay, float16 with loss scaling, a flag over a preset's default."""

import jax
import keras
import numpy as np
import pytest

from keras_tune import callbacks as cb
from keras_tune import cli, fit, training
from keras_tune import config as config_lib
from keras_tune.optim import WarmupDecay
from keras_tune.rundir import read_rows

from helpers import write_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("seed") / "corpus.txt")


class AppliedRates(keras.callbacks.Callback):
    """The learning rate the optimizer applies at each update: read on the batch that completes one."""

    def __init__(self, per_update):
        super().__init__()
        self.per_update, self.rates = per_update, []

    def on_train_batch_begin(self, batch, logs=None):
        optimizer = self.model.optimizer
        if (int(optimizer._iterations) + 1) % self.per_update == 0:  # this batch's gradients make an update
            self.rates.append(float(optimizer.learning_rate))


def test_steps_count_optimizer_updates_and_the_logged_learning_rate_is_the_applied_one(corpus, tmp_path):
    overrides = {"data.name": "text", "data.path": corpus, "train.steps": 10, "optimizer.accumulation_steps": 4,
                 "optimizer.schedule": "cosine", "optimizer.warmup_steps": 3, "optimizer.learning_rate": 1e-3,
                 "train.output_dir": str(tmp_path / "run"), "train.eval_steps": 1, "distribution.mesh": "1x1"}
    config = config_lib.load_config("gemma_tiny", overrides=overrides)
    applied = AppliedRates(4)
    result = training.run(config, devices=jax.devices()[:1], callbacks=[applied])
    from keras_tune.checkpoint import load_state_arrays

    iterations = int(load_state_arrays(str(tmp_path / "run"))["optimizer/iteration"])
    assert result.final_step == 10 and iterations == 40  # Keras counts the 40 batches: 10 updates of 4
    rows = [row for row in read_rows(str(tmp_path / "run" / "metrics.csv")) if row["loss"] is not None]
    assert [row["step"] for row in rows] == list(range(1, 11))
    schedule = WarmupDecay(1e-3, total_steps=10, warmup_steps=3, decay="cosine")
    expected = [float(schedule(update)) for update in range(10)]
    np.testing.assert_allclose([row["learning_rate"] for row in rows], expected, rtol=1e-5)  # 6 digits in the CSV
    np.testing.assert_allclose(applied.rates, expected, rtol=1e-6)
    checkpoints = tmp_path / "run" / "checkpoints"
    assert [path.name for path in checkpoints.iterdir() if path.name.isdigit()] == ["10"]  # named by update


def test_a_flag_given_wins_over_the_preset_and_sgd_drops_adamw_s_decay_and_clipping():
    preset = config_lib.load_config("gemma3_270m_offline")
    assert preset.train.steps == 60
    assert config_lib.load_config("gemma3_270m_offline", overrides={"train.epochs": 1}).train.steps == 0
    both = config_lib.load_config("gemma3_270m_offline", overrides={"train.epochs": 2, "train.steps": 7})
    assert (both.train.epochs, both.train.steps) == (2, 7)
    sgd = config_lib.load_config("gemma_tiny", overrides={"optimizer.name": "sgd"})
    assert (sgd.optimizer.weight_decay, sgd.optimizer.clipnorm) == (0.0, 0.0)
    asked = config_lib.load_config("gemma_tiny", overrides={"optimizer.name": "sgd", "optimizer.weight_decay": "0.1"})
    assert (asked.optimizer.weight_decay, asked.optimizer.clipnorm) == (0.1, 0.0)
    parser_args = fit.build_parser().parse_args(["--epochs", "1", "--optimizer", "sgd"])
    overrides = cli.overrides_from_args(parser_args, fit.FIT_FLAGS)
    config = config_lib.load_config("gemma3_270m_offline", overrides=overrides)
    assert (config.train.steps, config.optimizer.weight_decay, config.optimizer.clipnorm) == (0, 0.0, 0.0)


def test_the_run_says_how_many_updates_and_passes_it_makes(capsys):
    config = config_lib.load_config("gemma_tiny", overrides={"train.epochs": 3, "optimizer.accumulation_steps": 4})
    assert training.run_length(config, batches_per_epoch=10) == 7
    assert "training: 7 optimizer updates of 4 batches each (28 batches), 2.8 passes over the data" in \
        capsys.readouterr().out


def _float16_state(corpus, tmp_path):
    config = config_lib.load_config("gemma_tiny", overrides={
        "data.name": "text", "data.path": corpus, "train.precision": "mixed_float16", "distribution.mesh": "1x1",
        "train.steps": 6, "optimizer.learning_rate": 1e-3})
    from keras_tune.models.loader import build_model

    state = training.RunState(config=config, causal_lm=build_model(config, lora=True, devices=jax.devices()[:1]).causal_lm)
    training.setup_data(state)
    training.compile_model(state)
    return state


def test_mixed_float16_trains_with_loss_scaling_and_an_overflow_skips_one_update(corpus, tmp_path):
    state = _float16_state(corpus, tmp_path)
    trainer = state.trainer
    assert type(trainer.optimizer).__name__ == "LossScaleOptimizer"
    assert all(v.dtype == "float32" for v in trainer.trainable_variables)  # LoRA trains in float32
    batches = list(state.data.train.take(6).as_numpy_iterator())
    x, y, weights = batches[2]
    weights = weights.copy()
    weights[0, 0] = np.inf  # the third batch's loss and gradients overflow: inf / inf
    batches[2] = (x, y, weights)

    import tensorflow as tf

    dataset = tf.data.Dataset.from_generator(lambda: iter(batches), output_signature=tf.nest.map_structure(
        lambda a: tf.TensorSpec(a.shape, tf.as_dtype(a.dtype)), batches[0]))
    progress, lines = cb.Progress(total_steps=6), []
    tracker = cb.StepTracker(progress, log=lines.append, loss_scaled=True)
    before = [np.asarray(v.value).copy() for v in trainer.trainable_variables]
    with training.detached_preprocessor(trainer):
        trainer.fit(dataset, steps_per_epoch=6, epochs=1, verbose=0, callbacks=[tracker])
    assert progress.step == 6 and not progress.diverged, lines
    assert progress.skipped == [3] and lines == ["step 3: float16 overflow, update skipped (loss scale now 16384)"]
    assert int(trainer.optimizer.iterations) == 5  # five updates made, one skipped
    after = [np.asarray(v.value) for v in trainer.trainable_variables]
    assert all(np.isfinite(a).all() for a in after) and any((a != b).any() for a, b in zip(after, before))
