"""Training-time reporting as Keras callbacks (and nothing else).

`keras_tune.training.run` hands these to keras `fit`, in this order (each reads what
the ones before it wrote into the same `logs` dict):

- `Heartbeat`: beats the run's watchdog (`keras_tune.watchdog`) at every
  training and evaluation batch, and keeps evaluation in step with the loop.
- `CommittedState`: before each epoch, the model's, optimizer's and metrics'
  arrays are committed to their devices, so the train step compiles once.
- `StepTracker`: the run's global step (resumes included), the per-step loss, the
  stop at `--steps`, and the stop on a NaN/inf loss (no checkpoint, adapter or
  sample is written from a diverged model).
- `Throughput`: step time, tokens/s (all positions and non-pad ones) and an MFU
  estimate; shown in the progress bar and logged.
- `TaskScores`: at each evaluation, a task's scores (`--eval-task translation`:
  chrF and BLEU of greedy translations) added to the evaluation's logs.
- `MetricsLog`: one `metrics.csv` row a step (validation columns filled where an
  evaluation ran) and the same numbers as TensorBoard scalars, written as the run goes.
- `Samples`: generations for `--sample-prompt` before training, every
  `--sample-every` steps and after training, appended to `samples.txt`.
- `Checkpoints`: Orbax checkpoints every `--save-every` steps and at the end
  (`keras_tune.checkpoint`).
- `Preemption`: after SIGTERM, a checkpoint at the end of the step, then stop.

The files they write are `keras_tune.rundir`'s; FLOP counting and MFU are
`keras_tune.flops`'s; the token counts they read come from
`keras_tune.metrics.TokenCount`.

Example:

```python
progress = Progress(total_steps=100)
callbacks = [StepTracker(progress), Throughput(flops_per_token=6 * 2.5e9), MetricsLog(progress, "run")]
causal_lm.fit(data.train_stream(), steps_per_epoch=100, callbacks=callbacks)
```
"""

import dataclasses
import math
import os
import sys
import time

import keras

from keras_tune import rundir
from keras_tune.errors import Preempted

# Keras log keys -> metrics.csv columns for validation.
_VALIDATION_KEYS = {"val_loss": "val_loss", "val_perplexity": "val_perplexity", "val_accuracy": "val_accuracy"}
_COUNT_KEYS = ("tokens", "non_pad_tokens")


@dataclasses.dataclass
class Progress:
    """State the callbacks share.

    Keras steps through batches; with gradient accumulation an optimizer
    update takes `batches_per_update` of them. What a user counts (steps in
    `metrics.csv`, `--eval-every`, `--save-every`, `--sample-every`,
    checkpoint names) are updates.

    Attributes:
        total_steps: batches of the whole run.
        step: batches trained so far, counting those before a resume.
        initial_step: the batch this process started from (0, or a checkpoint's).
        batches_per_update: batches whose gradients make one optimizer update.
        step_loss: the loss of the latest batch alone (keras logs a running mean).
        nonfinite_step: the update whose loss was NaN/inf, if any.
        skipped: updates a float16 overflow skipped (`LossScaleMonitor`).
    """

    total_steps: int
    step: int = 0
    initial_step: int = 0
    batches_per_update: int = 1
    step_loss: float = float("nan")
    nonfinite_step: int = None
    nonfinite_loss: float = None
    skipped: list = dataclasses.field(default_factory=list)

    @property
    def diverged(self):
        return self.nonfinite_step is not None

    @property
    def update(self):
        """Optimizer updates made so far (batches, with accumulation, grouped)."""
        return self.step // self.batches_per_update

    @property
    def total_updates(self):
        return self.total_steps // self.batches_per_update

    @property
    def at_update(self):
        """Whether the latest batch completed an optimizer update."""
        return self.step % self.batches_per_update == 0


class CommittedState(keras.callbacks.Callback):
    """Commits the training state to its devices before each epoch's first step (`distribution.commit_to_devices`).

    Keras resets the metrics (to fresh, uncommitted arrays) just before
    `on_epoch_begin` and reads the state from the variables after it, so every
    step sees the same argument shardings.
    """

    def on_epoch_begin(self, epoch, logs=None):
        from keras_tune.distribution import commit_to_devices

        model = self._model
        commit_to_devices([*model.variables, *model.optimizer.variables, *model.metrics_variables])


class StepTracker(keras.callbacks.Callback):
    """Counts global steps, stops at `total_steps`, and stops on a NaN/inf loss.

    In a `mixed_float16` run (`loss_scaled`), a batch whose loss or gradients
    overflow float16 makes Keras' `LossScaleOptimizer` skip that update and
    halve its loss scale: that is logged as a skipped update, not divergence,
    until the scale falls below 1 (the loss is non-finite whatever the scale).

    Args:
        progress: the shared `Progress`.
        log: where the divergence and skip lines go.
        loss_scaled: the optimizer is a `LossScaleOptimizer` (mixed_float16).
    """

    def __init__(self, progress, log=None, loss_scaled=False):
        super().__init__()
        self.progress = progress
        self.log = log or (lambda line: print(line, file=sys.stderr))
        self.loss_scaled = loss_scaled
        self._mean = 0.0
        self._scale = None

    def on_epoch_begin(self, epoch, logs=None):
        self._mean = 0.0

    def on_epoch_end(self, epoch, logs=None):
        for key in ("step_loss", "val_step_loss"):  # a batch's figure, meaningless for an epoch
            (logs or {}).pop(key, None)

    def _skipped(self):
        """Whether the loss scale fell on this batch (an update skipped), logging it if so."""
        scale = float(self.model.optimizer.dynamic_scale)  # `self.model` syncs the state fit holds
        fell = self._scale is not None and scale < self._scale and scale >= 1.0
        self._scale = scale
        if fell:
            self.progress.skipped.append(self.progress.step)
            self.log(f"step {self.progress.update}: float16 overflow, update skipped (loss scale now {scale:g})")
        return fell

    def on_train_batch_end(self, batch, logs=None):
        progress, logs = self.progress, logs if logs is not None else {}
        progress.step += 1
        mean = float(logs.get("loss", float("nan")))
        own = logs.pop("step_loss", None)  # the batch's own loss (`metrics.StepLoss`); not for the progress bar
        # Without it: Keras logs the epoch's running mean (every batch weighs the
        # same), so one step's loss is k * m_k - (k - 1) * m_(k-1), to float32 precision.
        progress.step_loss = float(own) if own is not None else (batch + 1) * mean - batch * self._mean
        self._mean = mean
        skipped = self._skipped() if self.loss_scaled else False
        loss = progress.step_loss if own is not None else mean
        if not math.isfinite(loss) and not skipped and not progress.diverged:
            progress.nonfinite_step = progress.update
            progress.nonfinite_loss = loss
            self.log(f"loss is {loss} at step {progress.update}: stopping")
            self._model.stop_training = True
        if progress.step >= progress.total_steps:
            self._model.stop_training = True


class Throughput(keras.callbacks.Callback):
    """Step time, tokens/s (all and non-pad) and MFU, added to the keras logs.

    Reads the cumulative `tokens` / `non_pad_tokens` metrics (`TokenCount`) and
    replaces them by rates. A step's time runs from the end of the previous
    step's callbacks (put `clock()` last in the list) to the moment its results
    are on the host, so it includes fetching the batch. The first step of a
    `fit` call (compilation) is left out of the epoch averages.

    Args:
        flops_per_token: training FLOPs per token (`model_flops_per_token`); 0 = no MFU.
        peak_flops: peak FLOP/s of all devices together; 0 = no MFU.
    """

    def __init__(self, flops_per_token=0.0, peak_flops=0.0):
        super().__init__()
        self.flops_per_token = float(flops_per_token)
        self.peak_flops = float(peak_flops)

    def on_train_begin(self, logs=None):
        self._first = True

    def on_epoch_begin(self, epoch, logs=None):
        self._last = None
        self._counts = {key: 0.0 for key in _COUNT_KEYS}
        self._epoch = {"time": 0.0, "steps": 0, "tokens": 0.0, "non_pad_tokens": 0.0}

    def on_train_batch_begin(self, batch, logs=None):
        if self._last is None:
            self._last = time.perf_counter()

    def restart_clock(self):
        """Starts the next step's clock now (after this step's callbacks, e.g. samples, are done)."""
        self._last = time.perf_counter()

    def clock(self):
        """A callback to put last in the list: it restarts the clock, so time other callbacks
        spend between steps (generating samples, say) is not counted as step time."""
        throughput = self

        class _Clock(keras.callbacks.Callback):
            def on_train_batch_end(self, batch, logs=None):
                throughput.restart_clock()

        return _Clock()

    def _rates(self, seconds, tokens, non_pad):
        rates = {
            "step_time": seconds,
            "tokens_per_sec": tokens / seconds if seconds > 0 else 0.0,
            "non_pad_tokens_per_sec": non_pad / seconds if seconds > 0 else 0.0,
        }
        if self.flops_per_token and self.peak_flops:
            rates["mfu"] = rates["tokens_per_sec"] * self.flops_per_token / self.peak_flops
        return rates

    def on_train_batch_end(self, batch, logs=None):
        # Keras turned the logs into Python floats, so the step has finished.
        now = time.perf_counter()
        seconds, self._last = now - self._last, now
        logs = logs if logs is not None else {}
        deltas = {}
        for key in _COUNT_KEYS:
            total = float(logs.pop(key, 0.0))
            deltas[key], self._counts[key] = total - self._counts[key], total
        logs.update(self._rates(seconds, deltas["tokens"], deltas["non_pad_tokens"]))
        if self._first:
            self._first = False  # compilation
            return
        self._epoch["time"] += seconds
        self._epoch["steps"] += 1
        for key in _COUNT_KEYS:
            self._epoch[key] += deltas[key]

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        for key in (*_COUNT_KEYS, *(f"val_{k}" for k in _COUNT_KEYS)):
            logs.pop(key, None)
        if self._epoch["steps"]:
            rates = self._rates(self._epoch["time"] / self._epoch["steps"], self._epoch["tokens"] / self._epoch["steps"],
                                self._epoch["non_pad_tokens"] / self._epoch["steps"])
            logs.update(rates)


def _mean(values):
    """The mean of the numbers among `values` (None when there are none)."""
    numbers = [float(value) for value in values if value is not None]
    return sum(numbers) / len(numbers) if numbers else None


def metrics_header(columns=(), scores=()):
    """The header of a run's `metrics.csv`: `rundir.metrics_columns(columns)`, then `val_<score>` for each task score.

    Args:
        columns: an objective's own columns (`keras_tune.objectives.Objective.columns`).
        scores: a task's scores, which only evaluations have (e.g. ("chrf", "bleu")).
    """
    return rundir.metrics_columns(columns) + tuple(f"val_{name}" for name in scores)


class TaskScores(keras.callbacks.Callback):
    """Scores the run's task at each evaluation and adds the figures to that epoch's logs as `val_<name>`.

    It runs after Keras has validated (an epoch end whose logs hold `val_loss`)
    and before `MetricsLog` writes the row, which takes the figures from the logs.

    Args:
        progress: the shared `Progress`.
        score: `(model, step) -> {name: value}`; it gets the model `fit` holds
            (reading `self.model` syncs the trained weights into the CausalLM's
            variables) and the optimizer update the evaluation describes.
    """

    def __init__(self, progress, score):
        super().__init__()
        self.progress = progress
        self.score = score

    def on_epoch_end(self, epoch, logs=None):
        if logs is None or "val_loss" not in logs or self.progress.diverged:
            return
        scores = self.score(self.model, self.progress.update)
        logs.update({f"val_{name}": value for name, value in scores.items()})


def learning_rate_at(rate):
    """A `step -> float` reading of a learning rate: a number, or a schedule called with the step."""
    if callable(rate):
        return lambda step: float(rate(step))
    return lambda step: float(rate)


class MetricsLog(keras.callbacks.Callback):
    """Writes `metrics.csv` (a row an optimizer update) and TensorBoard scalars under `tensorboard/`.

    With gradient accumulation a row stands for its update's batches: their
    mean loss, their summed time, their tokens over that time.

    Rows are written at least every `every_seconds` while training, so a long
    epoch can be watched as it runs and a crash loses little, and at every epoch
    end. The epoch's last row waits for the epoch end, where the validation
    results (if any ran) join it, so the file never holds a step whose evaluation
    is missing. Rows after the last checkpoint are dropped by a resumed run
    before it writes them again (`keras_tune.training.restart_logs`); TensorBoard
    drops the orphaned steps itself when a resumed run writes a lower step.
    Tokens/s and MFU come from `Throughput`.

    An objective's own columns (`columns`, e.g. DPO's reward margin) come from its
    per-batch `step_<column>` metrics (`keras_tune.objectives.metrics`) and, at
    evaluations, `val_<column>`. A task's scores (`scores`, e.g. chrF) exist only at
    evaluations: `val_<score>` from the logs `TaskScores` filled.

    Args:
        progress: the shared `Progress`.
        output_dir: the run directory.
        learning_rate: `update -> learning rate` (see `learning_rate_at`), or None.
        every_seconds: the longest time between writes while training (0: epoch ends only).
        columns: an objective's own columns (`keras_tune.objectives.Objective.columns`).
        scores: a task's scores (`TaskScores`), e.g. ("chrf", "bleu").
    """

    def __init__(self, progress, output_dir, learning_rate=None, every_seconds=0.0, columns=(), scores=()):
        super().__init__()
        self.progress = progress
        self.learning_rate = learning_rate
        self.every_seconds = float(every_seconds)
        self.columns = tuple(columns)
        self.scores = tuple(scores)
        self.path = os.path.join(output_dir, "metrics.csv")
        self.tensorboard_dir = os.path.join(output_dir, "tensorboard")
        self._rows = []
        self._batches = []  # the batches of the update under way
        self._scalars = None
        self._written_at = time.monotonic()

    def on_train_begin(self, logs=None):
        if rundir.is_primary() and self._scalars is None:
            self._scalars = rundir.ScalarWriter(self.tensorboard_dir)
        self._written_at = time.monotonic()

    def on_train_batch_end(self, batch, logs=None):
        logs, progress = logs if logs is not None else {}, self.progress
        own = {column: logs.pop(f"step_{column}", None) for column in self.columns}  # not for the progress bar
        self._batches.append((progress.step_loss, logs.get("step_time"), logs.get("tokens_per_sec"),
                              logs.get("non_pad_tokens_per_sec"), logs.get("mfu"), own))
        if not progress.at_update:  # with accumulation: a row when the update is made
            return
        self._rows.append(self._update_row(progress.update))
        if self.every_seconds and time.monotonic() - self._written_at >= self.every_seconds:
            # The epoch's last row waits for its validation columns (`on_epoch_end`).
            self.flush(hold_last=batch + 1 >= (self.params or {}).get("steps", 0))

    def _update_row(self, update):
        """The row of one optimizer update, from its batches: mean loss, summed time, tokens over time."""
        batches, self._batches = self._batches, []
        losses, times, tokens, non_pad, mfu, own = zip(*batches)
        seconds = sum(t for t in times if t is not None) if all(t is not None for t in times) else None

        def rate(values):  # tokens/s of the update: its tokens over its time
            if seconds is None or any(v is None for v in values):
                return None
            return sum(v * t for v, t in zip(values, times)) / seconds if seconds > 0 else 0.0

        return {
            "step": update,
            "loss": sum(losses) / len(losses),
            "learning_rate": self.learning_rate(update - 1) if self.learning_rate else None,
            "step_time_s": seconds,
            "tokens_per_s": rate(tokens),
            "non_pad_tokens_per_s": rate(non_pad),
            "mfu": rate(mfu),
            **{column: _mean([values[column] for values in own]) for column in self.columns},
        }

    def on_epoch_end(self, epoch, logs=None):
        logs = logs if logs is not None else {}
        for column in self.columns:  # a batch's figures: meaningless for an epoch
            logs.pop(f"step_{column}", None)
            logs.pop(f"val_step_{column}", None)
        if self._rows and "val_loss" in logs:
            for key, column in _VALIDATION_KEYS.items():
                self._rows[-1][column] = logs.get(key)
            for column in self.columns + self.scores:
                self._rows[-1][f"val_{column}"] = logs.get(f"val_{column}")
        self.flush()

    def flush(self, hold_last=False):
        """Writes the rows kept so far (all, or all but the newest).

        Args:
            hold_last: keep the newest row back (it may still get validation columns).
        """
        cut = len(self._rows) - 1 if hold_last else len(self._rows)
        rows, self._rows = self._rows[:cut], self._rows[cut:]
        self._written_at = time.monotonic()
        if not rows or not rundir.is_primary():
            return
        rundir.append_rows(self.path, rows, columns=metrics_header(self.columns, self.scores))
        if self._scalars is not None:
            for row in rows:
                self._scalars.write(row["step"], {
                    "train/loss": row["loss"],
                    "train/learning_rate": row["learning_rate"],
                    "throughput/step_time_s": row.get("step_time_s"),
                    "throughput/tokens_per_s": row.get("tokens_per_s"),
                    "throughput/non_pad_tokens_per_s": row.get("non_pad_tokens_per_s"),
                    "throughput/mfu": row.get("mfu"),
                    **rundir.validation_scalars(row),
                    **{f"train/{column}": row.get(column) for column in self.columns},
                    **{f"validation/{column}": row.get(f"val_{column}") for column in self.columns + self.scores},
                })
            self._scalars.flush()

    def on_train_end(self, logs=None):
        self.flush()
        if self._scalars is not None:
            self._scalars.close()
            self._scalars = None


class Samples(keras.callbacks.Callback):
    """Generates from `prompts` before training, every `every` steps and after training.

    Sections are appended to `samples.txt`, each headed `=== step N (...) ===`.

    Args:
        progress: the shared `Progress`.
        prompts: prompt strings.
        path: the samples file.
        generate: `(model, prompts) -> texts`; it gets the model with the
            weights `fit` holds synced into it (`keras_tune.training` passes
            `keras_tune.decoding.generate_texts` with the detached preprocessor).
        every: optimizer updates between samples (0 = before and after only).
        log: where to echo the samples (None = quiet).
    """

    def __init__(self, progress, prompts, path, generate, every=0, log=print):
        super().__init__()
        self.progress = progress
        self.prompts = list(prompts)
        self.path = path
        self.generate = generate
        self.every = int(every)
        self.log = log
        self._last_step = None

    def write(self, step, label):
        if not self.prompts or self._last_step == step:
            return
        self._last_step = step
        # `self.model` syncs the weights fit holds back into the model's variables.
        texts = self.generate(self.model, self.prompts)
        block = rundir.sample_section(step, label, self.prompts, texts)
        if self.log:
            self.log(block.rstrip("\n"))
        if rundir.is_primary():
            rundir.append_text(self.path, block)

    def on_train_begin(self, logs=None):
        if self.progress.step == 0:
            self.write(0, "before training")

    def on_train_batch_end(self, batch, logs=None):
        progress = self.progress
        update = progress.update
        if (self.every and progress.at_update and update % self.every == 0 and progress.step < progress.total_steps
                and not progress.diverged):
            self.write(update, "training")

    def on_train_end(self, logs=None):
        if not self.progress.diverged:
            self.write(self.progress.update, "after training")


class Checkpoints(keras.callbacks.Callback):
    """Saves an Orbax checkpoint at the end of each epoch that ends on a multiple of `every` steps, and at the end.

    `training.run` makes its keras epochs divide `every`, so a checkpoint is always
    written after that step's evaluation and metrics rows: a resumed run
    repeats nothing and loses nothing. A diverged run writes no checkpoint.

    Args:
        progress: the shared `Progress`.
        store: a `keras_tune.checkpoint.CheckpointStore`.
        every: optimizer updates between checkpoints (0 = at the end only).
        metadata: `(progress, logs) -> dict` of extra JSON to store.
    """

    def __init__(self, progress, store, every=0, metadata=None):
        super().__init__()
        self.progress = progress
        self.store = store
        self.every = int(every)
        self.metadata = metadata or (lambda progress, logs: {})

    def on_epoch_end(self, epoch, logs=None):
        progress = self.progress
        if progress.diverged or progress.step == progress.initial_step:
            return
        update = progress.update
        if (self.every and update % self.every == 0) or progress.step >= progress.total_steps:
            self.store.save(update, self.model, self.metadata(progress, dict(logs or {})))

    def on_train_end(self, logs=None):
        self.store.wait()


def _any_process(flag):
    """Whether `flag` is set on any process (a small all-gather: every process calls it at the same step)."""
    import numpy as np
    from jax.experimental import multihost_utils

    return bool(np.asarray(multihost_utils.process_allgather(np.asarray([int(flag)], np.int32))).any())


class Preemption(keras.callbacks.Callback):
    """SIGTERM (a spot VM reclaimed, a Kaggle session ending): finish the step, checkpoint, stop.

    The signal is caught by the run's `keras_tune.watchdog.SigtermGuard` (which
    ends the process itself when the step cannot finish). At the end of every
    step the processes agree whether any of them got one (one small
    all-gather), so all of them write the same checkpoint together and stop. The
    metrics rows of the steps so far are flushed first, so a rerun continues
    exactly.

    Args:
        progress: the shared `Progress`.
        save: `(progress, model, logs) -> checkpoint path`, blocking until written.
        guard: the run's `SigtermGuard` (its `requested` and `acknowledge`).
        before_save: callables run first (e.g. `MetricsLog.flush`).
    """

    def __init__(self, progress, save, guard, before_save=()):
        super().__init__()
        self.progress = progress
        self.save = save
        self.guard = guard
        self.before_save = list(before_save)

    def on_train_begin(self, logs=None):
        import jax

        self._multi = jax.process_count() > 1

    def on_train_batch_end(self, batch, logs=None):
        progress = self.progress
        if not progress.at_update:  # the update under way finishes first: its rows and state stay whole
            return
        requested = _any_process(self.guard.requested) if self._multi else self.guard.requested
        if not requested or progress.diverged:
            return
        self.guard.acknowledge()
        for flush in self.before_save:
            flush()
        path = self.save(progress, self.model, dict(logs or {}))
        raise Preempted(f"stopped by SIGTERM after step {progress.update}; checkpoint {path} written: run the same "
                        "command again to continue from it")


class Heartbeat(keras.callbacks.Callback):
    """Beats the run's `keras_tune.watchdog.Watchdog` at every batch, naming what the loop is doing.

    The first batch of a `fit` or `evaluate` call (tracing, compiling), a
    compile JAX reports, and an epoch's end (checkpoints) are slow phases. Defining
    `on_test_batch_end` also makes Keras run evaluation callbacks in step with
    the loop instead of in a thread pool: evaluation then dispatches one batch
    after the other, as training does (several in flight at once deadlocked
    two-process runs over gloo, whose collectives must start in the same order
    on every process).

    Args:
        watchdog: the run's `Watchdog`.
        progress: the shared `Progress` (for the step numbers), or None.
    """

    def __init__(self, watchdog, progress=None):
        super().__init__()
        self.watchdog = watchdog
        self.progress = progress

    def _step(self):
        return self.progress.update if self.progress is not None else 0

    def on_train_begin(self, logs=None):
        self._first = True
        self.watchdog.beat("starting training", slow=True)

    def on_train_batch_begin(self, batch, logs=None):
        slow, self._first = self._first, False
        self.watchdog.beat(f"in training step {self._step() + 1}" + (" (its first: compiling)" if slow else ""),
                           slow=slow)

    def on_train_batch_end(self, batch, logs=None):
        # The callbacks after a step are quick (a compile they cause is noticed as one), and they
        # include the processes' SIGTERM agreement, a collective that a lost peer leaves hanging.
        self.watchdog.beat(f"after training step {self._step()} (samples, metrics, the SIGTERM check)")

    def on_epoch_end(self, epoch, logs=None):
        self.watchdog.beat(f"at the end of an epoch, step {self._step()} (checkpoint, samples)", slow=True)

    def on_test_begin(self, logs=None):
        self.watchdog.beat(f"starting an evaluation at step {self._step()}", slow=True)

    def on_test_batch_begin(self, batch, logs=None):
        self.watchdog.beat(f"in evaluation batch {batch + 1} at step {self._step()}", slow=batch == 0)

    def on_test_batch_end(self, batch, logs=None):
        self.watchdog.beat(f"after evaluation batch {batch + 1} at step {self._step()}")

    def on_test_end(self, logs=None):
        self.watchdog.beat(f"after an evaluation at step {self._step()}", slow=True)
