"""The guards of a run that must never hang: the watchdog, the SIGTERM guard, live metrics, each step's own loss."""

import os
import signal
import threading
import time

import numpy as np
import pytest

from keras_tune import callbacks as cb
from keras_tune import config as config_lib
from keras_tune.rundir import read_rows
from keras_tune.watchdog import HUNG_EXIT_CODE, SIGTERM_EXIT_CODE, SigtermGuard, Watchdog



def _recorder():
    lines, codes = [], []

    def end(code):
        codes.append(code)

    return lines, codes, lines.append, end


def _wait_for(condition, seconds=5.0):
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)
    return condition()


def test_the_watchdog_ends_the_process_with_one_line_naming_the_phase_when_no_beat_comes():
    lines, codes, log, end = _recorder()
    with Watchdog(0.3, 5.0, label="process 1 of 2", log=log, end=end) as watchdog:
        watchdog.beat("in training step 7")
        assert _wait_for(lambda: codes, 3.0)
    assert codes[0] == HUNG_EXIT_CODE == 5
    assert lines[0].startswith("error: process 1 of 2 made no progress for ")
    assert "in training step 7" in lines[0] and "--step-timeout" in lines[0]


def test_beats_keep_the_watchdog_quiet_and_slow_phases_and_compiles_get_the_longer_limit():
    lines, codes, log, end = _recorder()
    with Watchdog(0.25, 1.5, log=log, end=end) as watchdog:
        for step in range(10):  # a beat every 0.1 s: never 0.25 s without one
            watchdog.beat(f"in training step {step}")
            time.sleep(0.1)
        watchdog.beat("in training step 10 (its first: compiling)", slow=True)
        time.sleep(0.6)  # longer than a step may take, shorter than a slow phase
        watchdog.beat("in training step 11")
        watchdog.compiling(True)  # JAX lowered a program: a backend compile runs
        time.sleep(0.6)
        watchdog.compiling(False)
        assert not codes, lines
        watchdog.beat("in training step 12")  # the next beat ends the slow phase
        assert watchdog.limit() == 0.25
        assert _wait_for(lambda: codes, 3.0)  # no beat after it: the step limit applies
    assert "in training step 12" in lines[0]


def test_a_step_timeout_of_zero_starts_no_watchdog():
    lines, codes, log, end = _recorder()
    with Watchdog(0, 0, log=log, end=end) as watchdog:
        watchdog.check(now=time.monotonic() + 10_000)
        assert watchdog._thread is None
    assert not codes


@pytest.fixture
def guard_lines():
    lines, codes, log, end = _recorder()
    yield lines, codes, log, end


def test_sigterm_asks_the_loop_to_stop_and_a_loop_that_acknowledges_in_time_is_left_alone(guard_lines):
    lines, codes, log, end = guard_lines
    with SigtermGuard(0.5, label="the process", log=log, end=end) as guard:
        os.kill(os.getpid(), signal.SIGTERM)
        assert _wait_for(lambda: guard.requested, 2.0)  # the Python handler ran
        guard.acknowledge()
        time.sleep(0.8)
    assert not codes and not lines
    assert signal.getsignal(signal.SIGTERM) is not guard._handler  # the previous handler is back


def test_sigterm_on_a_loop_stuck_in_a_step_ends_the_process_after_the_grace_period(guard_lines):
    lines, codes, log, end = guard_lines
    with SigtermGuard(0.3, label="process 0 of 2", last_checkpoint=lambda: "checkpoint runs/x/checkpoints/8",
                      log=log, end=end):
        os.kill(os.getpid(), signal.SIGTERM)
        assert _wait_for(lambda: codes, 3.0)
    assert codes == [SIGTERM_EXIT_CODE] == [143]
    assert lines == ["stopped: SIGTERM and process 0 of 2 did not reach the end of its step within 0.3 s; "
                     "exiting without a new checkpoint (a rerun continues from checkpoint runs/x/checkpoints/8)"]


def test_a_second_sigterm_ends_the_process_at_once(guard_lines):
    lines, codes, log, end = guard_lines
    with SigtermGuard(60, log=log, end=end):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.1)
        os.kill(os.getpid(), signal.SIGTERM)
        assert _wait_for(lambda: codes, 3.0)
    assert codes == [143] and "got a second one" in lines[0]


def test_the_guard_outside_the_main_thread_installs_nothing():
    before = signal.getsignal(signal.SIGTERM)
    result = {}

    def worker():
        with SigtermGuard(1) as guard:
            result["installed"] = guard._installed

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert result == {"installed": False} and signal.getsignal(signal.SIGTERM) is before


def test_metrics_rows_are_written_while_the_epoch_runs_and_the_last_waits_for_its_validation(tmp_path):
    progress = cb.Progress(total_steps=6)
    log = cb.MetricsLog(progress, str(tmp_path), every_seconds=1e-9)
    log.set_params({"steps": 3})
    path = tmp_path / "metrics.csv"
    log.on_train_begin()
    for epoch in range(2):
        for batch in range(3):
            progress.step += 1
            progress.step_loss = float(progress.step)
            log.on_train_batch_end(batch, {})
            written = [row["step"] for row in read_rows(str(path))] if path.exists() else []
            # Every row is on disk at once, except the epoch's last: it waits for the epoch end.
            assert written == list(range(1, progress.step + (0 if batch == 2 else 1)))
        log.on_epoch_end(epoch, {"val_loss": 0.5 + epoch} if epoch == 1 else {})
    log.on_train_end()
    rows = read_rows(str(path))
    assert [row["step"] for row in rows] == [1, 2, 3, 4, 5, 6]
    assert [row["val_loss"] for row in rows] == [None] * 5 + [1.5]
    assert [row["loss"] for row in rows] == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]


def test_without_a_time_limit_rows_wait_for_the_epoch_end(tmp_path):
    progress = cb.Progress(total_steps=3)
    log = cb.MetricsLog(progress, str(tmp_path), every_seconds=0)
    log.set_params({"steps": 3})
    for batch in range(2):
        progress.step += 1
        log.on_train_batch_end(batch, {})
    assert not (tmp_path / "metrics.csv").exists()


@pytest.mark.parametrize("loss", ["sparse", "full"])
def test_step_loss_is_the_batch_s_own_loss_as_the_compiled_loss_computes_it(loss, tmp_path):
    from keras_tune import training
    from keras_tune.models.loader import build_model

    config = config_lib.load_config("gemma_tiny", overrides={
        "distribution.mesh": "1x1", "train.loss": loss, "data.name": "text", "data.batch_size": 4,
        "data.path": str(_corpus(tmp_path)), "train.steps": 1,
    })
    import jax

    state = training.RunState(config=config, causal_lm=build_model(config, lora=True, devices=jax.devices()[:1]).causal_lm)
    training.setup_data(state)
    training.compile_model(state)
    batch = state.data.train.take(1)
    with training.detached_preprocessor(state.trainer):
        result = state.trainer.evaluate(batch, steps=1, verbose=0, return_dict=True)
    # One batch: keras' loss (the running mean of one) is the batch's loss.
    np.testing.assert_allclose(result["step_loss"], result["loss"], rtol=1e-6)


def _corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(f"document {i} holds a few words and a number {i * 7}." * 4 for i in range(40)))
    return path


def test_the_heartbeat_keeps_evaluation_callbacks_in_step_with_the_loop():
    """Keras runs batch-end callbacks in a thread pool unless one of them needs each batch's logs;
    the heartbeat needs them, so evaluation dispatches one batch after the other."""
    from keras.callbacks import CallbackList

    watchdog = Watchdog(0, 0)
    assert CallbackList([])._async_test is True  # Keras' default, what deadlocked two processes
    listed = CallbackList([cb.Heartbeat(watchdog)])
    assert listed._async_test is False and listed._async_train is False
