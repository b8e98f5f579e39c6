"""Two processes on localhost (JAX multi-controller, gloo CPU collectives) train as one process does.

Each process simulates 4 CPU devices; together they form a 2x4 mesh whose batch
axis spans the processes, so each reads its own half of every global batch. The
tests start, bound in time and stop their own processes.
"""

import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from keras_tune import fit
from keras_tune.rundir import read_rows

from helpers import REPO, adapter_arrays, max_diff, write_corpus

STEPS = 12
LIMIT_S = 420


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env(timeout_s=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_FLAGS", "KERAS_DISTRIBUTION"))}
    env.update(PYTHONUNBUFFERED="1", JAX_PLATFORMS="cpu")
    if timeout_s:
        env["KERAS_TUNE_INITIALIZATION_TIMEOUT_S"] = str(timeout_s)
    return env


def _flags(corpus, out, steps=STEPS):
    return ["--preset", "gemma_tiny", "--data", "text", "--data-path", corpus, "--steps", str(steps),
            "--save-every", "4", "--eval-every", "4", "--eval-steps", "1", "--mesh", "2x4", "--output-dir", str(out)]


def _start(flags, log_dir, port, count=2, timeout_s=None, tag="run"):
    processes = []
    for index in range(count):
        log = open(log_dir / f"{tag}-{index}.log", "w")
        command = [sys.executable, "-m", "keras_tune.fit", *flags, "--simulate-devices", str(8 // count),
                   "--coordinator", f"127.0.0.1:{port}", "--num-processes", str(count), "--process-id", str(index)]
        processes.append((subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                           env=_env(timeout_s), start_new_session=True), log))
    return processes


def _stop(processes):
    for process, log in processes:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)  # their own process groups: nothing else is touched
            process.wait()
        log.close()


def _wait(processes, limit=LIMIT_S):
    deadline = time.time() + limit
    try:
        while any(p.poll() is None for p, _ in processes) and time.time() < deadline:
            time.sleep(0.2)
    finally:
        _stop(processes)
    return [p.returncode for p, _ in processes]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("multiprocess") / "corpus.txt")


@pytest.fixture(scope="module")
def one_process(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "run"
    assert fit.main(_flags(corpus, out)) == 0
    return out


@pytest.mark.slow
def test_two_processes_train_like_one_and_resume_after_both_are_killed(corpus, one_process, tmp_path):
    """Both processes are killed (-9) once the first checkpoint is written; the rerun resumes from it.

    The killed-and-resumed pair logs every step's loss and validation loss as
    the single process does, and ends with its adapter: the steps before the
    kill and after the resume are both two-process training.
    """
    killed = tmp_path / "killed"
    processes = _start(_flags(corpus, killed), tmp_path, _free_port(), tag="killed")
    first = killed / "checkpoints" / "4"
    deadline = time.time() + LIMIT_S
    try:
        while not first.is_dir() and time.time() < deadline and all(p.poll() is None for p, _ in processes):
            time.sleep(0.05)
    finally:
        _stop(processes)  # kill -9 both
    logs = "\n".join((tmp_path / f"killed-{i}.log").read_text()[-1500:] for i in range(2))
    assert first.is_dir(), logs
    assert not (killed / "adapter.npz").exists(), "the run finished before it was killed"
    codes = _wait(_start(_flags(corpus, killed), tmp_path, _free_port(), tag="resumed"))
    logs = "\n".join((tmp_path / f"resumed-{i}.log").read_text()[-1500:] for i in range(2))
    assert codes == [0, 0], logs
    assert "resuming from" in (tmp_path / "resumed-0.log").read_text()
    single, double = read_rows(str(one_process / "metrics.csv")), read_rows(str(killed / "metrics.csv"))
    assert [r["step"] for r in double] == [r["step"] for r in single] == list(range(STEPS + 1))
    np.testing.assert_allclose([r["loss"] for r in double[1:]], [r["loss"] for r in single[1:]], rtol=1e-5)
    np.testing.assert_allclose([r["val_loss"] for r in double if r["val_loss"] is not None],
                               [r["val_loss"] for r in single if r["val_loss"] is not None], rtol=1e-5)
    assert max_diff(adapter_arrays(killed / "adapter.npz"), adapter_arrays(one_process / "adapter.npz")) <= 1e-5


def test_a_coordinator_nobody_answers_is_one_line_and_exit_2_not_a_hang(corpus, tmp_path):
    started = time.time()
    processes = _start(_flags(corpus, tmp_path / "lonely"), tmp_path, _free_port(), count=2, timeout_s=15,
                       tag="lonely")
    _stop(processes[1:])  # process 1 never comes: process 0 waits for it in vain
    codes = _wait(processes[:1], limit=120)
    output = (tmp_path / "lonely-0.log").read_text()
    assert codes == [2], output[-2000:]
    assert time.time() - started < 100
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "did not all connect within 15 s" in errors[0], output[-2000:]
    assert "Traceback" not in output


def test_an_incomplete_or_malformed_multi_process_request_is_one_line(capsys):
    cases = [
        (["--coordinator", "localhost", "--num-processes", "2", "--process-id", "0"], "expected HOST:PORT"),
        (["--coordinator", "localhost:1234", "--num-processes", "2"], "expected all three"),
        (["--coordinator", "localhost:1234", "--num-processes", "2", "--process-id", "2"], "expected 0 .. 1"),
    ]
    for argv, fragment in cases:
        assert fit.main(["--preset", "gemma_tiny", "--dry-run", *argv]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and fragment in lines[0], lines


def write_pairs(path, count=203, seed=1):
    """A JSONL of prompt/response pairs: `count` (odd) so no split divides evenly between two processes."""
    import json
    import random

    words = "the model learns small words from a tiny corpus and every step makes the loss go down".split()
    rng = random.Random(seed)

    def text():
        return " ".join(rng.choice(words) for _ in range(rng.randint(3, 12)))

    path.write_text("".join(json.dumps({"prompt": text(), "response": text()}) + "\n" for _ in range(count)))
    return str(path)


def _loss_rows(path):
    rows = read_rows(str(path))
    return [r["loss"] for r in rows if r["loss"] is not None], [r["val_loss"] for r in rows if r["val_loss"] is not None]


def _one_and_two(flags, tmp_path, tag):
    """Runs `flags` in this process and as two processes; returns both runs' (losses, validation losses)."""
    assert fit.main([*flags, "--output-dir", str(tmp_path / f"{tag}-one")]) == 0
    codes = _wait(_start([*flags, "--output-dir", str(tmp_path / f"{tag}-two")], tmp_path, _free_port(), tag=tag))
    logs = "\n".join((tmp_path / f"{tag}-{i}.log").read_text()[-2000:] for i in range(2))
    assert codes == [0, 0], logs
    assert "ran out of data" not in logs and "Gloo" not in logs, logs  # counted in advance; gloo's lines hidden
    return _loss_rows(tmp_path / f"{tag}-one" / "metrics.csv"), _loss_rows(tmp_path / f"{tag}-two" / "metrics.csv")


@pytest.mark.slow
def test_two_processes_evaluate_a_whole_uneven_split_and_train_two_epochs_like_one(tmp_path):
    """No --eval-steps. A validation split of 61 batches (483 rows, the last batch filled with copies),
    evaluated whole before and after training: several evaluation steps in flight at once deadlocked the
    two processes. Then two epochs of an odd number of prompt/response pairs. Both end, with one
    process's losses."""
    corpus = write_corpus(tmp_path / "corpus.txt", paragraphs=1000)
    flags = ["--preset", "gemma_tiny", "--data", "text", "--data-path", corpus, "--steps", "4", "--mesh", "2x4",
             "--set", "data.validation_fraction=0.4", "--set", "data.max_validation_examples=400"]
    (one_loss, one_val), (two_loss, two_val) = _one_and_two(flags, tmp_path, "whole")
    assert len(two_loss) == len(one_loss) == 4 and len(two_val) == len(one_val) == 2
    np.testing.assert_allclose(two_loss, one_loss, rtol=1e-5)
    np.testing.assert_allclose(two_val, one_val, rtol=1e-5)

    pairs = write_pairs(tmp_path / "pairs.jsonl")
    flags = ["--preset", "gemma_tiny", "--data", "text", "--data-path", pairs, "--epochs", "2", "--mesh", "2x4"]
    (one_loss, one_val), (two_loss, two_val) = _one_and_two(flags, tmp_path, "epochs")
    assert len(two_loss) == len(one_loss) > 10 and len(two_val) == len(one_val) == 2
    np.testing.assert_allclose(two_loss, one_loss, rtol=1e-5)
    np.testing.assert_allclose(two_val, one_val, rtol=1e-5)


def _long_flags(corpus, out, *extra):
    return ["--preset", "gemma_tiny", "--data", "text", "--data-path", corpus, "--steps", "2000", "--eval-steps", "1",
            "--mesh", "2x4", "--log-every", "0.2", "--output-dir", str(out), *extra]


def _training(processes, out, limit=240):
    """Waits until the run logs training rows (it is past its first step); fails if a process ends first."""
    deadline, metrics = time.time() + limit, out / "metrics.csv"
    while time.time() < deadline and all(p.poll() is None for p, _ in processes):
        if metrics.exists() and any(row["loss"] is not None for row in read_rows(str(metrics))):
            return
        time.sleep(0.1)
    _stop(processes)
    raise AssertionError(f"the run did not get to training: codes {[p.poll() for p, _ in processes]}")


def _ended_alone(processes, index, limit):
    """Waits up to `limit` s for process `index` to end; returns (its exit code, seconds it took, its log)."""
    process, log = processes[index]
    started = time.time()
    try:
        process.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        pass
    took = time.time() - started
    code = process.poll()
    _stop(processes)
    return code, took, open(log.name).read()


@pytest.mark.slow
@pytest.mark.parametrize("how", ["stalls", "dies"])
def test_a_peer_that_stalls_or_dies_inside_a_step_ends_the_other_with_one_line(corpus, tmp_path, how):
    out = tmp_path / "run"
    # The peer may stop in a slow phase (an epoch's end, an evaluation's start: train.compile_timeout); both
    # timeouts stay far under JAX's own heartbeat timeout, which would abort the process without a line.
    flags = _long_flags(corpus, out, "--step-timeout", "15", "--set", "train.compile_timeout=25")
    processes = _start(flags, tmp_path, _free_port(), tag=how)
    _training(processes, out)
    peer = processes[1][0].pid
    os.kill(peer, signal.SIGSTOP if how == "stalls" else signal.SIGKILL)
    code, took, output = _ended_alone(processes, 0, limit=90)
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert code == 5, output[-3000:]
    assert len(errors) == 1 and "Traceback" not in output, output[-3000:]
    if how == "stalls":  # the watchdog: no progress for --step-timeout seconds
        assert errors[0].startswith("error: process 0 of 2 made no progress for ")
        waited = float(errors[0].split("made no progress for ")[1].split()[0])
        assert 15 <= waited <= 27 and 15 <= took < 60
    else:  # the collective fails at once: the connection to the peer is gone
        assert errors[0].startswith("error: process 0 of 2 lost a peer ") and "a rerun continues from" in errors[0]
        assert took < 30


@pytest.mark.slow
def test_sigterm_to_a_process_whose_peer_is_stuck_ends_it_within_the_grace_period(corpus, tmp_path):
    out = tmp_path / "run"
    flags = _long_flags(corpus, out, "--step-timeout", "600", "--set", "train.sigterm_grace=5")
    processes = _start(flags, tmp_path, _free_port(), tag="sigterm")
    _training(processes, out)
    os.kill(processes[1][0].pid, signal.SIGSTOP)
    time.sleep(2)  # process 0 is now waiting for its peer inside a collective
    os.kill(processes[0][0].pid, signal.SIGTERM)
    code, took, output = _ended_alone(processes, 0, limit=60)
    stopped = [line for line in output.splitlines() if line.startswith("stopped: ")]
    assert code == 143 and took < 20, output[-3000:]
    assert len(stopped) == 1 and "did not reach the end of its step within 5 s" in stopped[0], output[-3000:]


@pytest.mark.slow
def test_sigterm_inside_a_long_epoch_then_a_rerun_logs_what_an_uninterrupted_run_logs(corpus, tmp_path):
    """One epoch of 400 steps, no periodic checkpoint: SIGTERM to process 0 alone stops both at the same
    step with one checkpoint; the rerun's every logged loss is the uninterrupted (one-process) run's."""
    flags = ["--preset", "gemma_tiny", "--data", "text", "--data-path", corpus, "--steps", "400", "--eval-steps", "1",
             "--mesh", "2x4", "--log-every", "0.2"]
    reference = tmp_path / "reference"
    assert fit.main([*flags, "--output-dir", str(reference)]) == 0
    out = tmp_path / "preempted"
    processes = _start([*flags, "--output-dir", str(out)], tmp_path, _free_port(), tag="term")
    _training(processes, out)
    os.kill(processes[0][0].pid, signal.SIGTERM)
    codes = _wait(processes, limit=120)
    logs = "\n".join((tmp_path / f"term-{i}.log").read_text()[-2000:] for i in range(2))
    assert codes == [143, 143], logs
    (step,) = [int(name) for name in os.listdir(out / "checkpoints") if name.isdigit()]
    assert 0 < step < 400, logs
    codes = _wait(_start([*flags, "--output-dir", str(out)], tmp_path, _free_port(), tag="rerun"))
    logs = "\n".join((tmp_path / f"rerun-{i}.log").read_text()[-2000:] for i in range(2))
    assert codes == [0, 0] and f"resuming from {out}/checkpoints/{step}: step {step}" in logs, logs
    resumed, single = read_rows(str(out / "metrics.csv")), read_rows(str(reference / "metrics.csv"))
    assert [r["step"] for r in resumed] == [r["step"] for r in single] == list(range(401))
    np.testing.assert_allclose([r["loss"] for r in resumed[1:]], [r["loss"] for r in single[1:]], rtol=1e-5)


def test_jax_heartbeat_timeout_outlasts_both_watchdog_limits():
    """A peer stopped in a slow phase is the watchdog's to report (one line, exit 5); JAX's coordination
    service must not abort the process first (SIGABRT, a C++ stack and no line)."""
    from keras_tune.distribution import DEFAULT_HEARTBEAT_TIMEOUT_S, heartbeat_timeout

    assert heartbeat_timeout(0, 1800) == DEFAULT_HEARTBEAT_TIMEOUT_S  # watchdog off: JAX's default
    assert heartbeat_timeout(15, 25) == DEFAULT_HEARTBEAT_TIMEOUT_S
    assert heartbeat_timeout(300, 1800) == 1860 and heartbeat_timeout(600, 30) == 660
