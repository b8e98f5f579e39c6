"""Runs that end well: SIGTERM checkpoints and exits 143, bad run directories and full disks are one line."""

import errno
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from keras_tune import fit
from keras_tune.rundir import read_rows

from helpers import REPO, adapter_arrays, max_diff, run_to_end, subprocess_env, write_corpus

STEPS = 24


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("preemption") / "corpus.txt")


def _flags(corpus, out, steps=STEPS):
    return ["--preset", "gemma_tiny", "--data", "text", "--data-path", corpus, "--steps", str(steps),
            "--save-every", "8", "--eval-every", "8", "--eval-steps", "1", "--output-dir", str(out)]


def test_sigterm_checkpoints_the_current_step_exits_143_and_the_rerun_ends_where_an_uninterrupted_run_ends(
        corpus, tmp_path):
    reference = tmp_path / "reference"
    assert fit.main(_flags(corpus, reference)) == 0
    out = tmp_path / "preempted"
    command = [sys.executable, "-m", "keras_tune.fit", *_flags(corpus, out)]
    log_path = tmp_path / "first.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=subprocess_env())
        metrics = out / "metrics.csv"
        deadline = time.time() + 240
        # Signal once training is under way (a few steps logged), between checkpoints.
        while process.poll() is None and time.time() < deadline:
            rows = read_rows(str(metrics)) if metrics.exists() else []
            if any(row["loss"] is not None for row in rows):
                break
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=120)
        finally:
            if process.poll() is None:
                process.kill()
    output = log_path.read_text()
    assert process.returncode == 143, output[-3000:]
    stopped = [line for line in output.splitlines() if line.startswith("stopped: ")]
    assert len(stopped) == 1 and "run the same command again to continue" in stopped[0], output[-2000:]
    assert "Traceback" not in output
    saved = sorted(int(step) for step in os.listdir(out / "checkpoints") if step.isdigit())
    assert saved and saved[-1] < STEPS and not (out / "adapter.npz").exists()

    resumed = run_to_end(command)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    assert f"resuming from {out}/checkpoints/{saved[-1]}: step {saved[-1]}" in resumed.stdout
    assert max_diff(adapter_arrays(reference / "adapter.npz"), adapter_arrays(out / "adapter.npz")) <= 1e-6
    assert [r["step"] for r in read_rows(str(out / "metrics.csv"))] == list(range(STEPS + 1))


def _one_error_line(capsys):
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def test_an_output_dir_that_is_a_file_is_one_line_and_exit_2(tmp_path, capsys, no_model):
    taken = tmp_path / "taken"
    taken.write_text("keep")
    assert fit.main(["--preset", "gemma_tiny", "--output-dir", str(taken)]) == 2
    assert "is a file; expected a directory" in _one_error_line(capsys)
    assert fit.main(["--preset", "gemma_tiny", "--output-dir", str(taken / "run")]) == 2
    assert "cannot create it" in _one_error_line(capsys)
    assert taken.read_text() == "keep"


def test_an_output_dir_nobody_may_create_is_one_line_and_exit_2(tmp_path, capsys, no_model, monkeypatch):
    def refuse(path, exist_ok=False):  # what a non-root user meets in a folder of root's
        raise PermissionError(errno.EACCES, "Permission denied", path)

    monkeypatch.setattr("keras_tune.rundir.os.makedirs", refuse)
    assert fit.main(["--preset", "gemma_tiny", "--output-dir", str(tmp_path / "locked" / "run")]) == 2
    assert "cannot create it (Permission denied)" in _one_error_line(capsys)


def test_a_bad_output_dir_in_a_real_process_is_one_line(tmp_path):
    taken = tmp_path / "taken"
    taken.write_text("keep")
    result = subprocess.run([sys.executable, "-m", "keras_tune.fit", "--preset", "gemma_tiny", "--output-dir",
                             str(taken)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == f"error: --output-dir {taken}: is a file; expected a directory " \
                                                      "(new, or a run to continue)"


def _full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_while_checkpointing_keeps_the_previous_checkpoint_and_adapter(corpus, tmp_path, capsys,
                                                                                   monkeypatch):
    out = tmp_path / "run"
    assert fit.main(_flags(corpus, out, steps=8)) == 0
    adapter = adapter_arrays(out / "adapter.npz")
    capsys.readouterr()
    import orbax.checkpoint as ocp

    monkeypatch.setattr(ocp.CheckpointManager, "save", _full_disk)
    assert fit.main(_flags(corpus, out, steps=16)) == 4  # continue to 16: the checkpoint at 16 cannot be written
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("warning: ")]
    assert len(err) == 1 and err[0].startswith("error: could not write checkpoint 16"), err
    assert f"the previous checkpoint {out}/checkpoints/8 is intact" in err[0]
    assert sorted(os.listdir(out / "checkpoints")) == ["8"]
    assert max_diff(adapter_arrays(out / "adapter.npz"), adapter) == 0


def test_a_full_disk_while_writing_the_adapter_keeps_the_previous_one(corpus, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert fit.main(_flags(corpus, out, steps=8)) == 0
    adapter = adapter_arrays(out / "adapter.npz")
    capsys.readouterr()

    def savez_then_full(path, **arrays):
        with open(path, "wb") as file:
            file.write(b"half an adapter")
        _full_disk()

    monkeypatch.setattr("keras_tune.lora.np.savez", savez_then_full)
    assert fit.main(_flags(corpus, out, steps=16)) == 4
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("warning: ")]
    assert len(err) == 1 and "could not write" in err[0] and "No space left on device" in err[0], err
    assert "checkpoints/16 are intact" in err[0] or "checkpoint " in err[0]
    assert max_diff(adapter_arrays(out / "adapter.npz"), adapter) == 0
    assert not [name for name in os.listdir(out) if ".partial-" in name]
    assert np.isfinite(read_rows(str(out / "metrics.csv"))[-1]["loss"])


def test_seq_len_beyond_the_trained_context_is_a_warning_naming_both(capsys, no_model):
    assert fit.main(["--preset", "gemma_2b_en", "--seq-len", "9000", "--mesh", "1x8", "--batch-size", "8",
                         "--dry-run"]) == 0
    err = capsys.readouterr().err
    assert "--seq-len 9000 is beyond the 8192 tokens gemma_2b_en was trained on" in err


@pytest.mark.slow
def test_sigterm_inside_a_long_epoch_resumes_exactly_and_metrics_are_on_disk_while_it_runs(corpus, tmp_path):
    """One epoch of 400 steps, no periodic checkpoint or evaluation: metrics.csv has rows while the run is
    still going (--log-every), SIGTERM writes the state after the step it names, and every loss the rerun
    logs is the uninterrupted run's."""
    flags = ["--preset", "gemma_tiny", "--data", "text", "--data-path", corpus, "--steps", "400", "--eval-steps", "1",
             "--log-every", "0.2"]
    reference = tmp_path / "reference"
    assert fit.main([*flags, "--output-dir", str(reference)]) == 0
    out = tmp_path / "preempted"
    command = [sys.executable, "-m", "keras_tune.fit", *flags, "--output-dir", str(out)]
    with open(tmp_path / "first.log", "w") as log:
        process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=subprocess_env())
        try:
            metrics, deadline, live = out / "metrics.csv", time.time() + 240, []
            while process.poll() is None and time.time() < deadline and len(live) < 5:
                live = [row for row in (read_rows(str(metrics)) if metrics.exists() else []) if row["loss"] is not None]
                time.sleep(0.05)
            running = process.poll() is None
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=120)
        finally:
            if process.poll() is None:
                process.kill()
    output = (tmp_path / "first.log").read_text()
    assert running and len(live) >= 5, output[-2000:]  # rows of the one epoch, read while it ran
    assert process.returncode == 143, output[-3000:]
    (step,) = [int(name) for name in os.listdir(out / "checkpoints") if name.isdigit()]
    assert 0 < step < 400
    resumed = run_to_end(command)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    rows, uninterrupted = read_rows(str(out / "metrics.csv")), read_rows(str(reference / "metrics.csv"))
    assert [r["step"] for r in rows] == [r["step"] for r in uninterrupted] == list(range(401))
    after = [r["loss"] for r in rows if r["step"] > step]
    np.testing.assert_allclose(after, [r["loss"] for r in uninterrupted if r["step"] > step], rtol=1e-6)
    np.testing.assert_allclose([r["loss"] for r in rows[1:]], [r["loss"] for r in uninterrupted[1:]], rtol=1e-6)
    assert max_diff(adapter_arrays(reference / "adapter.npz"), adapter_arrays(out / "adapter.npz")) <= 1e-6
