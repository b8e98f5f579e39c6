"""The files a run leaves, and the one way keras_tune writes any file: atomically.

A run directory holds `config.json`, `metrics.csv` (a row a step, validation
columns where an evaluation ran), `tensorboard/`, `samples.txt`, `loss.png`,
`checkpoints/` (Orbax, `keras_tune.checkpoint`) and the adapter. Everything here
is plain Python (no Keras), so a notebook can read a finished run's metrics
without starting JAX:

```python
from keras_tune import rundir
rows = rundir.read_rows("runs/gemma_tiny-20260101-000000/metrics.csv")
rundir.plot_losses("runs/.../metrics.csv", "loss.png", title="gemma_tiny")
```
"""

import contextlib
import csv
import glob
import math
import os
import re
import time
from pathlib import Path

from keras_tune.errors import UserError

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


def is_primary():
    """Whether this process writes the run directory (process 0 of a multi-process run)."""
    import jax

    return jax.process_index() == 0


@contextlib.contextmanager
def atomic_write(path, suffix=""):
    """Yields a temporary path beside `path`; renames it onto `path` if the block succeeds.

    Readers see the old file or the whole new one, never half of one. When the
    block raises (a full disk, say), the temporary file is removed and `path`
    keeps its previous contents.

    Args:
        path: the destination file.
        suffix: appended to the temporary name, for writers that insist on an
            extension (`numpy.savez` adds `.npz` to names without it).

    Example:

    ```python
    with atomic_write("run/config.json") as partial:
        Path(partial).write_text(text)
    ```
    """
    path = Path(path)
    partial = path.with_name(f"{path.name}.partial-{os.getpid()}{suffix}")
    try:
        yield str(partial)
        os.replace(partial, path)
    finally:
        if partial.exists():
            partial.unlink()


def write_directory(path, write):
    """Writes a directory with `write(partial_path)`, then moves it into place, replacing an older one.

    A crash leaves the older directory whole (or none), never half of the new one.

    Args:
        path: the directory to write.
        write: `folder -> None`, filling a new folder.
    """
    import shutil
    import tempfile

    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    partial = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", dir=parent)
    old = None
    try:
        write(partial)
        if os.path.exists(path):
            old = f"{partial}.old"
            os.rename(path, old)
        os.rename(partial, path)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        if old is not None and not os.path.exists(path):
            os.rename(old, path)  # put the older one back
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def refuse_existing(path, flag):
    """Refuses an output that exists and is not empty, before any model is built.

    Args:
        path: a directory or file the export would write.
        flag: the command-line flag naming it, for the message.
    """
    if os.path.isfile(path) or (os.path.isdir(path) and os.listdir(path)):
        raise UserError(f"{flag} {path}: the directory exists and is not empty; expected a new directory"
                        if os.path.isdir(path) else f"{flag} {path}: the file exists; expected a new path")


def write_text(path, text):
    """Writes `text` to `path` atomically (UTF-8).

    Args:
        path: the destination file; its folder must exist.
        text: the whole contents.
    """
    with atomic_write(path) as partial:
        Path(partial).write_text(text, encoding="utf-8")


# ---------------------------------------------------------------------------
# metrics.csv


def _format(value):
    if value is None or value == "":
        return ""
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def _write_rows(file, rows, header, columns=CSV_COLUMNS):
    writer = csv.writer(file)
    if header:
        writer.writerow(columns)
    for row in rows:
        writer.writerow([_format(row.get(column)) for column in columns])


def metrics_columns(extra=()):
    """The columns of a run's `metrics.csv`: `CSV_COLUMNS`, then an objective's own and their `val_` ones.

    Args:
        extra: an objective's per-step columns (`keras_tune.objectives`), e.g. ("divergence",).
    """
    return CSV_COLUMNS + tuple(extra) + tuple(f"val_{column}" for column in extra)


def _header(path):
    """The columns of an existing metrics CSV (None when it has none yet)."""
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        return None
    with open(path, newline="") as file:
        return tuple(next(csv.reader(file), ())) or None


def append_rows(path, rows, columns=CSV_COLUMNS):
    """Appends `rows` to a metrics CSV, writing the header first if needed.

    Args:
        path: the CSV file.
        rows: dicts; missing columns are left empty.
        columns: the header of a new file (`metrics_columns`); an existing file keeps its own.
    """
    existing = _header(path)
    with open(path, "a", newline="") as file:
        _write_rows(file, rows, header=existing is None, columns=existing or tuple(columns))
        file.flush()
        os.fsync(file.fileno())


def read_rows(path):
    """Reads a metrics CSV into a list of dicts with float values (empty cells are None).

    Args:
        path: the CSV file; a missing file reads as no rows.
    """
    if not os.path.exists(path):
        return []
    with open(path, newline="") as file:
        return [
            {key: (float(value) if value not in ("", None) else None) for key, value in record.items()}
            for record in csv.DictReader(file)
        ]


def truncate_rows(path, last_step):
    """Drops the rows after `last_step` (what a killed run logged past its checkpoint).

    Args:
        path: the CSV file.
        last_step: the newest step to keep (-1 keeps nothing).
    """
    rows = read_rows(path)
    kept = [row for row in rows if row["step"] is not None and row["step"] <= last_step]
    if len(kept) == len(rows):
        return
    kept = [{k: (int(v) if k == "step" else v) for k, v in row.items()} for row in kept]
    columns = _header(path) or CSV_COLUMNS  # an objective's columns stay
    with atomic_write(path) as partial:
        with open(partial, "w", newline="") as file:
            _write_rows(file, kept, header=True, columns=columns)


# ---------------------------------------------------------------------------
# samples.txt

_SECTION = re.compile(r"^=== step (\d+)")


def sample_section(step, label, prompts, texts):
    """One `samples.txt` section: a `=== step N (label) ===` header, then each prompt and its text.

    Args:
        step: the training step the samples were generated at.
        label: e.g. "before training".
        prompts: the prompts.
        texts: the generated continuations, one a prompt.
    """
    lines = [f"=== step {step} ({label}) ==="]
    for prompt, text in zip(prompts, texts):
        lines += [f">>> {prompt}", text.rstrip(), ""]
    return "\n".join(lines) + "\n"


def append_text(path, text):
    """Appends `text` to a UTF-8 file (samples.txt).

    Args:
        path: the file; created if missing.
        text: what to append.
    """
    with open(path, "a", encoding="utf-8") as file:
        file.write(text)


def truncate_samples(path, last_step):
    """Drops the sections of `samples.txt` written after `last_step` (by a killed run).

    Args:
        path: the samples file.
        last_step: the newest step whose section is kept (-1 keeps none).
    """
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
        write_text(path, "\n".join(kept).rstrip("\n") + "\n\n")


# ---------------------------------------------------------------------------
# TensorBoard


class ScalarWriter:
    """TensorBoard scalars through TensorFlow's core summary ops (no tensorboard package needed to write).

    Args:
        directory: the event-file folder (`<run>/tensorboard`).
    """

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
        """Writes `{name: value}` at `step`; None and NaN values are skipped."""
        if self.writer is None:
            return
        tf = self._tf
        with self.writer.as_default():
            for name, value in scalars.items():
                if value is not None and value == value:
                    tf.summary.write(name, tf.constant(float(value), tf.float32), step=int(step), metadata=self._metadata)

    def flush(self):
        """Puts what was written on disk, for TensorBoard to show while the run goes on."""
        if self.writer is not None:
            self.writer.flush()

    def close(self):
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()


def validation_scalars(row):
    """The TensorBoard scalars of a metrics row's validation columns."""
    return {
        "validation/loss": row.get("val_loss"),
        "validation/perplexity": row.get("val_perplexity"),
        "validation/accuracy": row.get("val_accuracy"),
    }


def log_evaluation(output_dir, step, results, columns=()):
    """Writes an evaluation outside `fit` (the one before training) as a metrics row and scalars.

    Args:
        output_dir: the run directory.
        step: the step it describes.
        results: keras `evaluate(..., return_dict=True)` output.
        columns: an objective's own columns (`metrics_columns`), logged as `val_<column>`.
    """
    row = {"step": step, "val_loss": results.get("loss"), "val_perplexity": results.get("perplexity"),
           "val_accuracy": results.get("accuracy"), **{f"val_{c}": results.get(c) for c in columns}}
    append_rows(os.path.join(output_dir, "metrics.csv"), [row], columns=metrics_columns(columns))
    scalars = ScalarWriter(os.path.join(output_dir, "tensorboard"))
    scalars.write(step, {**validation_scalars(row), **{f"validation/{c}": row[f"val_{c}"] for c in columns}})
    scalars.close()


# ---------------------------------------------------------------------------
# loss.png


def _moving_mean(values, window):
    return [sum(values[max(0, i - window + 1): i + 1]) / len(values[max(0, i - window + 1): i + 1])
            for i in range(len(values))]


def _plot_series(axes, train, validation):
    """One panel: a training series per step (and smoothed) and its validation points."""
    if train:
        steps, values = zip(*train)
        window = max(1, len(values) // 20)
        axes.plot(steps, values, color="tab:blue", alpha=0.3 if window > 1 else 0.9, linewidth=1, label="train (per step)")
        if window > 1:
            axes.plot(steps, _moving_mean(values, window), color="tab:blue", linewidth=2, label=f"train (mean of {window})")
    if validation:
        steps, values = zip(*validation)
        axes.plot(steps, values, "o-", color="tab:orange", linewidth=2, label="validation")
    axes.grid(alpha=0.3)
    if train or validation:
        axes.legend()


def plot_losses(csv_path, png_path, title=""):
    """Draws training (per step, and smoothed) and validation loss from `metrics.csv` into a PNG.

    An objective's own columns (`metrics_columns`) get a panel each under the loss, and so does
    each task score an evaluation adds (`val_chrf`, `val_bleu` with `--eval-task`).

    Args:
        csv_path: the run's `metrics.csv`.
        png_path: the picture to write (atomically).
        title: the plot's title.

    Returns:
        The PNG path, or None when there is nothing to draw.
    """
    rows = read_rows(csv_path)
    train = [(row["step"], row["loss"]) for row in rows if row.get("loss") is not None and math.isfinite(row["loss"])]
    validation = [(row["step"], row["val_loss"]) for row in rows if row.get("val_loss") is not None]
    if not train and not validation:
        return None
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib import pyplot

    # An objective's own columns (keras_tune.objectives: divergence, reward margin, ...): a panel each below.
    header = rows[0] if rows else {}
    extra = [column for column in header if column not in CSV_COLUMNS
             and not column.startswith("val_") and any(row.get(column) is not None for row in rows)]
    # A task's scores (--eval-task: val_chrf, val_bleu) exist only at evaluations: a panel each, points only.
    scores = [column for column in header if column.startswith("val_") and column not in CSV_COLUMNS
              and column[4:] not in header and any(row.get(column) is not None for row in rows)]
    count = 1 + len(extra) + len(scores)
    figure, panels = pyplot.subplots(count, 1, figsize=(7, 4 + 2.2 * (count - 1)), dpi=100, sharex=True,
                                     squeeze=False)
    axes = panels[0, 0]
    _plot_series(axes, train, validation)
    axes.set_ylabel("loss (mean next-token NLL, nats)" if not extra else "loss")
    axes.set_title(title or "loss")
    for panel, column in zip(panels[1:, 0], extra):
        _plot_series(panel, [(row["step"], row[column]) for row in rows if row.get(column) is not None],
                     [(row["step"], row[f"val_{column}"]) for row in rows if row.get(f"val_{column}") is not None])
        panel.set_ylabel(column.replace("_", " "))
    for panel, column in zip(panels[1 + len(extra):, 0], scores):
        _plot_series(panel, [], [(row["step"], row[column]) for row in rows if row.get(column) is not None])
        panel.set_ylabel(column[4:])
    panels[-1, 0].set_xlabel("step")
    figure.tight_layout()
    with atomic_write(png_path, suffix=".png") as partial:
        figure.savefig(partial)
    pyplot.close(figure)
    return png_path


# ---------------------------------------------------------------------------
# The run directory itself.


def default_output_dir(config):
    """`runs/<preset>-<date>-<time>`.

    Args:
        config: the run config.
    """
    return os.path.join("runs", f"{config.preset or 'custom'}-{time.strftime('%Y%m%d-%H%M%S')}")


def resolve_output_dir(config):
    """The run directory: `--output-dir`, else with `--resume` the newest `runs/<preset>-*` holding checkpoints.

    Args:
        config: the run config.
    """
    train_config = config.train
    if train_config.output_dir:
        return train_config.output_dir
    if train_config.resume:
        pattern = os.path.join("runs", f"{config.preset or 'custom'}-*")
        candidates = [d for d in glob.glob(pattern) if os.path.isdir(os.path.join(d, "checkpoints"))]
        if not candidates:
            raise UserError(
                f"--resume: no run of preset {config.preset} under runs/ holds a checkpoint; "
                "expected --output-dir DIR naming the run to continue"
            )
        return max(candidates, key=os.path.getmtime)
    return default_output_dir(config)


def check_output_dir(output_dir):
    """Refuses a run directory that cannot be written, before anything is built or written.

    Args:
        output_dir: the run directory.

    Returns:
        `output_dir`.
    """
    flag = f"--output-dir {output_dir}"
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise UserError(f"{flag}: is a file; expected a directory (new, or a run to continue)")
    existing = os.path.abspath(output_dir)
    while not os.path.exists(existing):  # the nearest folder that exists must let us create the rest
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UserError(f"{flag}: cannot create it ({existing} is a file); expected a directory you can write")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{flag}: cannot create it ({existing} is not writable); expected a directory you can write")
    return output_dir


def make_run_dir(output_dir):
    """Creates the run directory, or says in one line why it cannot.

    Args:
        output_dir: the run directory.
    """
    try:
        os.makedirs(output_dir, exist_ok=True)
    except OSError as error:  # no permission, a read-only disk: what os.access cannot tell root
        raise UserError(f"--output-dir {output_dir}: cannot create it ({error.strerror or error}); "
                        "expected a directory you can write")
