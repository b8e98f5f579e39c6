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
