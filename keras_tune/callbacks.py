"""Training-time reporting as Keras callbacks, and the pictures a run leaves.

`keras_tune.fit.run` hands these to keras `fit`, in this order (each reads what
the ones before it wrote into the same `logs` dict):

- `StepTracker`: the run's global step (resumes included), the per-step loss, the
  stop at `--steps`, and the stop on a NaN/inf loss (no checkpoint, adapter or
  sample is written from a diverged model).
- `Throughput`: step time, tokens/s (all positions and non-pad ones) and an MFU
  estimate; shown in the progress bar and logged.
- `MetricsLog`: one `metrics.csv` row a step (validation columns filled where an
  evaluation ran) and the same numbers as TensorBoard scalars.
- `Samples`: generations for `--sample-prompt` before training, every
  `--sample-every` steps and after training, appended to `samples.txt`.
- `Checkpoints`: Orbax checkpoints every `--save-every` steps and at the end
  (`keras_tune.checkpoint`).

`plot_losses` draws `loss.png` from `metrics.csv`.

MFU ("model FLOPs utilization") counts the FLOPs the model needs, not what the
hardware ran: per token `4 N + 2 N_trainable` for the dense layers (forward,
gradient with respect to activations, and weight gradients only where weights
train: 6 N for full fine-tuning, as in PaLM's definition) plus
`12 * layers * seq_len * heads * head_dim` for attention (no causal or sliding
window discount, so an upper bound there), divided by the peak dense bf16 FLOP/s
of the devices (`PEAK_TFLOPS`, or `--peak-tflops` per device).

Example:

```python
progress = Progress(total_steps=100)
callbacks = [StepTracker(progress), Throughput(flops_per_token=6 * 2.5e9), MetricsLog(progress, "run")]
causal_lm.fit(data.train.repeat(), steps_per_epoch=100, callbacks=callbacks)
plot_losses("run/metrics.csv", "run/loss.png")
```
"""

import csv
import dataclasses
import math
import os
import re
import sys
import time

import keras


# Dense bf16 peak TFLOP/s of one JAX device (a TPU v2/v3 device is one core, half
# a chip; v4 and later expose one device a chip). First match on device_kind wins.
PEAK_TFLOPS = (
    (r"TPU v2", 22.5),
    (r"TPU v3", 61.5),
    (r"TPU v4", 275.0),
    (r"TPU v5 ?(lite|e)", 197.0),
    (r"TPU v5", 459.0),  # v5p
    (r"TPU v6", 918.0),  # v6e (Trillium)
    (r"H100.*PCIe", 756.0),
    (r"H100|H200|GH200", 989.0),
    (r"A100", 312.0),
    (r"L40S", 362.0),
    (r"\bL4\b", 121.0),
    (r"\bT4\b", 65.0),  # float16: a T4 has no bfloat16 units
    (r"V100", 125.0),  # float16
)

CSV_COLUMNS = (
    "step",
    "loss",
    "learning_rate",
    "step_time_s",
    "tokens_per_s",
    "non_pad_tokens_per_s",
    "mfu",
    "val_loss",
    "val_perplexity",
    "val_accuracy",
)
# Keras log keys -> metrics.csv columns for validation.
_VALIDATION_KEYS = {"val_loss": "val_loss", "val_perplexity": "val_perplexity", "val_accuracy": "val_accuracy"}
_COUNT_KEYS = ("tokens", "non_pad_tokens")


def is_primary():
    """Whether this process writes the run directory (process 0 of a multi-host run)."""
    import jax

    return jax.process_index() == 0


def peak_tflops_per_device(device_kind):
    """Dense bf16 peak TFLOP/s of a device from its `device_kind`, or 0.0 if unknown.

    Args:
        device_kind: `jax.devices()[0].device_kind`, e.g. "TPU v4" or "NVIDIA H100 80GB HBM3".
    """
    for pattern, tflops in PEAK_TFLOPS:
        if re.search(pattern, device_kind or "", flags=re.IGNORECASE):
            return tflops
    return 0.0


def flops_per_token(total_params, trainable_params, num_layers, attention_width, seq_len):
    """Training FLOPs per token: dense layers plus attention (see the module docstring).

    Args:
        total_params: every parameter of the model (tied embeddings count once:
            they are the output projection).
        trainable_params: parameters that receive weight gradients.
        num_layers: transformer blocks.
        attention_width: query heads times head dimension.
        seq_len: tokens per sequence.
    """
    dense = 4 * total_params + 2 * trainable_params
    attention = 12 * num_layers * seq_len * attention_width
    return float(dense + attention)


def model_flops_per_token(backbone, seq_len):
    """`flops_per_token` for a keras-hub Gemma backbone."""
    total = sum(math.prod(v.shape) for v in backbone.weights)
    trainable = sum(math.prod(v.shape) for v in backbone.trainable_weights)
    width = int(getattr(backbone, "num_query_heads", 0)) * int(getattr(backbone, "head_dim", 0))
    return flops_per_token(total, trainable, int(getattr(backbone, "num_layers", 0)), width, seq_len)


@keras.saving.register_keras_serializable(package="keras_tune")
class TokenCount(keras.metrics.Metric):
    """Counts target positions in the batches seen since the last reset.

    Args:
        pad_token_id: with `non_pad=True`, targets equal to it are not counted.
        non_pad: count only targets that are not padding.
    """

    def __init__(self, pad_token_id=0, non_pad=False, name=None, **kwargs):
        super().__init__(name=name or ("non_pad_tokens" if non_pad else "tokens"), **kwargs)
        self.pad_token_id = int(pad_token_id)
        self.non_pad = bool(non_pad)
        self.count = self.add_variable(shape=(), initializer="zeros", dtype="float32", name="count")

    def update_state(self, y_true, y_pred=None, sample_weight=None):
        if self.non_pad:
            counted = keras.ops.sum(keras.ops.cast(keras.ops.not_equal(y_true, self.pad_token_id), "float32"))
        else:
            counted = keras.ops.cast(keras.ops.size(y_true), "float32")
        self.count.assign_add(counted)

    def result(self):
        return keras.ops.convert_to_tensor(self.count)

    def get_config(self):
        return {**super().get_config(), "pad_token_id": self.pad_token_id, "non_pad": self.non_pad}


@dataclasses.dataclass
class Progress:
    """State the callbacks share.

    Attributes:
        total_steps: steps of the whole run.
        step: batches trained so far, counting the steps before a resume.
        initial_step: the step this process started from (0, or a checkpoint's).
        step_loss: the loss of the latest step alone (keras logs a running mean).
        nonfinite_step: the step whose loss was NaN/inf, if any.
    """

    total_steps: int
    step: int = 0
    initial_step: int = 0
    step_loss: float = float("nan")
    nonfinite_step: int = None
    nonfinite_loss: float = None

    @property
    def diverged(self):
        return self.nonfinite_step is not None


class StepTracker(keras.callbacks.Callback):
    """Counts global steps, stops at `total_steps`, and stops on a NaN/inf loss.

    Args:
        progress: the shared `Progress`.
        log: where the divergence line goes.
    """

    def __init__(self, progress, log=None):
        super().__init__()
        self.progress = progress
        self.log = log or (lambda line: print(line, file=sys.stderr))
        self._mean = 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self._mean = 0.0

    def on_train_batch_end(self, batch, logs=None):
        progress = self.progress
        progress.step += 1
        mean = float((logs or {}).get("loss", float("nan")))
        # Keras logs the epoch's running mean (every batch weighs the same), so one
        # step's own loss is k * m_k - (k - 1) * m_(k-1).
        progress.step_loss = (batch + 1) * mean - batch * self._mean
        self._mean = mean
        if not math.isfinite(mean) and not progress.diverged:
            progress.nonfinite_step = progress.step
            progress.nonfinite_loss = mean
            self.log(f"loss is {mean} at step {progress.step}: stopping")
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


def learning_rate_at(rate):
    """A `step -> float` reading of a learning rate: a number, or a schedule called with the step."""
    if callable(rate):
        return lambda step: float(rate(step))
    return lambda step: float(rate)


class _ScalarWriter:
    """TensorBoard scalars through TensorFlow's core summary ops (no tensorboard package needed to write)."""

    def __init__(self, directory):
        self.writer = None
        try:
            import tensorflow as tf
            from tensorflow.core.framework import summary_pb2
        except ImportError:  # TensorBoard events are optional
            return
        self._tf = tf
        self._metadata = summary_pb2.SummaryMetadata(
            plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars")
        )
        self.writer = tf.summary.create_file_writer(directory)

    def write(self, step, scalars):
        if self.writer is None:
            return
        tf = self._tf
        with self.writer.as_default():
            for name, value in scalars.items():
                if value is not None and value == value:
                    tf.summary.write(name, tf.constant(float(value), tf.float32), step=int(step), metadata=self._metadata)

    def close(self):
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()


def _format(value):
    if value is None or value == "":
        return ""
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def append_rows(path, rows):
    """Appends `rows` (dicts keyed by `CSV_COLUMNS`) to a metrics CSV, writing the header first if needed."""
    fresh = not os.path.exists(path) or os.path.getsize(path) == 0
    with open(path, "a", newline="") as file:
        writer = csv.writer(file)
        if fresh:
            writer.writerow(CSV_COLUMNS)
        for row in rows:
            writer.writerow([_format(row.get(column)) for column in CSV_COLUMNS])
        file.flush()
        os.fsync(file.fileno())


def read_rows(path):
    """Reads a metrics CSV into a list of dicts with float values (empty cells are None)."""
    if not os.path.exists(path):
        return []
    rows = []
    with open(path, newline="") as file:
        for record in csv.DictReader(file):
            rows.append({key: (float(value) if value not in ("", None) else None) for key, value in record.items()})
    return rows


def truncate_rows(path, last_step):
    """Drops the rows after `last_step` (what a killed run logged past its checkpoint)."""
    rows = read_rows(path)
    kept = [row for row in rows if row["step"] is not None and row["step"] <= last_step]
    if len(kept) == len(rows):
        return
    partial = f"{path}.partial-{os.getpid()}"
    if os.path.exists(partial):
        os.remove(partial)
    append_rows(partial, [{k: (int(v) if k == "step" else v) for k, v in row.items()} for row in kept])
    os.replace(partial, path)


class MetricsLog(keras.callbacks.Callback):
    """Writes `metrics.csv` (a row a step) and TensorBoard scalars under `tensorboard/`.

    Rows of an epoch are written at its end, with the validation results (if
    any ran) on the epoch's last step, so the file never holds a step whose
    evaluation is missing. Tokens/s and MFU come from `Throughput`.

    Args:
        progress: the shared `Progress`.
        output_dir: the run directory.
        learning_rate: `step -> learning rate` (see `learning_rate_at`), or None.
    """

    def __init__(self, progress, output_dir, learning_rate=None):
        super().__init__()
        self.progress = progress
        self.learning_rate = learning_rate
        self.path = os.path.join(output_dir, "metrics.csv")
        self.tensorboard_dir = os.path.join(output_dir, "tensorboard")
        self._rows = []
        self._scalars = None

    def on_train_begin(self, logs=None):
        if is_primary() and self._scalars is None:
            self._scalars = _ScalarWriter(self.tensorboard_dir)

    def on_train_batch_end(self, batch, logs=None):
        logs = logs or {}
        step = self.progress.step
        self._rows.append(
            {
                "step": step,
                "loss": self.progress.step_loss,
                "learning_rate": self.learning_rate(step - 1) if self.learning_rate else None,
                "step_time_s": logs.get("step_time"),
                "tokens_per_s": logs.get("tokens_per_sec"),
                "non_pad_tokens_per_s": logs.get("non_pad_tokens_per_sec"),
                "mfu": logs.get("mfu"),
            }
        )

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        if self._rows and "val_loss" in logs:
            for key, column in _VALIDATION_KEYS.items():
                self._rows[-1][column] = logs.get(key)
        self.flush()

    def flush(self):
        rows, self._rows = self._rows, []
        if not rows or not is_primary():
            return
        append_rows(self.path, rows)
        if self._scalars is not None:
            for row in rows:
                self._scalars.write(row["step"], {
                    "train/loss": row["loss"],
                    "train/learning_rate": row["learning_rate"],
                    "throughput/step_time_s": row.get("step_time_s"),
                    "throughput/tokens_per_s": row.get("tokens_per_s"),
                    "throughput/non_pad_tokens_per_s": row.get("non_pad_tokens_per_s"),
                    "throughput/mfu": row.get("mfu"),
                    "validation/loss": row.get("val_loss"),
                    "validation/perplexity": row.get("val_perplexity"),
                    "validation/accuracy": row.get("val_accuracy"),
                })

    def on_train_end(self, logs=None):
        self.flush()
        if self._scalars is not None:
            self._scalars.close()
            self._scalars = None


def log_evaluation(output_dir, step, results):
    """Writes an evaluation outside `fit` (the one before training) as a metrics row and scalars."""
    if not is_primary():
        return
    row = {"step": step, "val_loss": results.get("loss"), "val_perplexity": results.get("perplexity"),
           "val_accuracy": results.get("accuracy")}
    append_rows(os.path.join(output_dir, "metrics.csv"), [row])
    scalars = _ScalarWriter(os.path.join(output_dir, "tensorboard"))
    scalars.write(step, {"validation/loss": row["val_loss"], "validation/perplexity": row["val_perplexity"],
                         "validation/accuracy": row["val_accuracy"]})
    scalars.close()


# ---------------------------------------------------------------------------
# Samples.

_SECTION = re.compile(r"^=== step (\d+)")


def truncate_samples(path, last_step):
    """Drops the sections of `samples.txt` written after `last_step` (by a killed run)."""
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as file:
        lines = file.read().split("\n")
    kept = []
    for line in lines:
        match = _SECTION.match(line)
        if match and int(match.group(1)) > last_step:
            break
        kept.append(line)
    if len(kept) != len(lines):
        partial = f"{path}.partial-{os.getpid()}"
        with open(partial, "w", encoding="utf-8") as file:
            file.write("\n".join(kept).rstrip("\n") + "\n\n")
        os.replace(partial, path)


class Samples(keras.callbacks.Callback):
    """Generates from `prompts` before training, every `every` steps and after training.

    Sections are appended to `samples.txt`, each headed `=== step N (...) ===`.

    Args:
        progress: the shared `Progress`.
        prompts: prompt strings.
        path: the samples file.
        generate: `(model, prompts) -> texts`; it gets the model with the
            weights `fit` holds synced into it (`keras_tune.fit` passes
            `keras_tune.generate.generate_texts` with the detached preprocessor).
        every: steps between samples (0 = before and after only).
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
        lines = [f"=== step {step} ({label}) ==="]
        for prompt, text in zip(self.prompts, texts):
            lines += [f">>> {prompt}", text.rstrip(), ""]
        block = "\n".join(lines) + "\n"
        if self.log:
            self.log(block.rstrip("\n"))
        if is_primary():
            with open(self.path, "a", encoding="utf-8") as file:
                file.write(block)

    def on_train_begin(self, logs=None):
        if self.progress.step == 0:
            self.write(0, "before training")

    def on_train_batch_end(self, batch, logs=None):
        step = self.progress.step
        if self.every and step % self.every == 0 and step < self.progress.total_steps and not self.progress.diverged:
            self.write(step, "training")

    def on_train_end(self, logs=None):
        if not self.progress.diverged:
            self.write(self.progress.step, "after training")


class Checkpoints(keras.callbacks.Callback):
    """Saves an Orbax checkpoint at the end of each epoch that ends on a multiple of `every` steps, and at the end.

    `fit.run` makes its keras epochs divide `every`, so a checkpoint is always
    written after that step's evaluation and metrics rows: a resumed run
    repeats nothing and loses nothing. A diverged run writes no checkpoint.

    Args:
        progress: the shared `Progress`.
        store: a `keras_tune.checkpoint.CheckpointStore`.
        every: steps between checkpoints (0 = at the end only).
        metadata: `(step, logs) -> dict` of extra JSON to store.
    """

    def __init__(self, progress, store, every=0, metadata=None):
        super().__init__()
        self.progress = progress
        self.store = store
        self.every = int(every)
        self.metadata = metadata or (lambda step, logs: {})

    def on_epoch_end(self, epoch, logs=None):
        step = self.progress.step
        if self.progress.diverged or step == self.progress.initial_step:
            return
        if (self.every and step % self.every == 0) or step >= self.progress.total_steps:
            self.store.save(step, self.model, self.metadata(step, dict(logs or {})))

    def on_train_end(self, logs=None):
        self.store.wait()


# ---------------------------------------------------------------------------
# The loss picture.


def plot_losses(csv_path, png_path, title=""):
    """Draws training (per step, and smoothed) and validation loss from `metrics.csv` into a PNG.

    Returns the PNG path, or None when there is nothing to draw.
    """
    rows = read_rows(csv_path)
    train = [(row["step"], row["loss"]) for row in rows if row.get("loss") is not None and math.isfinite(row["loss"])]
    validation = [(row["step"], row["val_loss"]) for row in rows if row.get("val_loss") is not None]
    if not train and not validation:
        return None
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(figsize=(7, 4), dpi=100)
    if train:
        steps, losses = zip(*train)
        window = max(1, len(losses) // 20)
        axes.plot(steps, losses, color="tab:blue", alpha=0.3 if window > 1 else 0.9, linewidth=1, label="train (per step)")
        if window > 1:
            smooth = [sum(losses[max(0, i - window + 1): i + 1]) / len(losses[max(0, i - window + 1): i + 1])
                      for i in range(len(losses))]
            axes.plot(steps, smooth, color="tab:blue", linewidth=2, label=f"train (mean of {window})")
    if validation:
        steps, losses = zip(*validation)
        axes.plot(steps, losses, "o-", color="tab:orange", linewidth=2, label="validation")
    axes.set_xlabel("step")
    axes.set_ylabel("loss (mean next-token NLL, nats)")
    axes.set_title(title or "loss")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    partial = f"{png_path}.partial-{os.getpid()}.png"
    figure.savefig(partial)
    pyplot.close(figure)
    os.replace(partial, png_path)
    return png_path
