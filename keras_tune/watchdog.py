"""Runs that never hang: a watchdog over the training loop, and SIGTERM honoured even when a step is stuck.

A process of a multi-process run that loses its peer (killed, hung, or on a
machine that went away) blocks inside a collective, in C++, where Python cannot
interrupt it: the run would sit there until someone kills it, and a SIGTERM
would do nothing. Two guards run beside the main thread while `fit` trains:

- `Watchdog`: the training loop beats it at every batch (training and
  evaluation, `Heartbeat`) and around its slow phases; a backend compile also
  counts (JAX's monitoring events). When no beat comes for `step_timeout`
  seconds (`compile_timeout` while a first step or a compile runs), it prints
  one line naming the process and the phase it is stuck in, and ends the
  process with exit code 5. Every process of a run has its own, so every one
  of them ends: the one that is stuck, and those that wait for it.
- `SigtermGuard`: SIGTERM asks the loop to stop after its step (the
  `Preemption` callback then writes a checkpoint and exits 143). Python runs
  signal handlers only between bytecodes, so a thread reads the signal from a
  wakeup pipe instead: when the loop has not reached the end of a step within
  `grace` seconds, or a second SIGTERM comes, the process ends there with exit
  code 143 and one line saying which checkpoint a rerun continues from.

Example:

```python
with Watchdog(step_timeout=300, compile_timeout=1800, label="process 0 of 2") as watchdog:
    model.fit(data, callbacks=[Heartbeat(watchdog), ...])
```
"""

import os
import signal
import sys
import threading
import time

HUNG_EXIT_CODE = 5
SIGTERM_EXIT_CODE = 143
_JAX_LOWERED = "/jax/core/compile/jaxpr_to_mlir_module_duration"
_JAX_COMPILED = "/jax/core/compile/backend_compile_duration"
_active = []  # the running watchdogs; JAX's compile events go to them
_listening = False


def _on_jax_event(event, duration, **kwargs):
    for watchdog in list(_active):
        if event == _JAX_LOWERED:
            watchdog.compiling(True)
        elif event == _JAX_COMPILED:
            watchdog.compiling(False)


def _listen_to_compiles():
    """Registers one JAX monitoring listener for the process (JAX offers no way to remove one)."""
    global _listening
    if _listening:
        return
    import jax

    jax.monitoring.register_event_duration_secs_listener(_on_jax_event)
    _listening = True


def process_label():
    """"process I of N" in a multi-process run, "the process" otherwise."""
    import jax

    count = jax.process_count()
    return f"process {jax.process_index()} of {count}" if count > 1 else "the process"


class Watchdog:
    """Ends the process with one line when the training loop makes no progress for too long.

    Args:
        step_timeout: seconds a step (or an evaluation batch) may take; 0 turns the watchdog off.
        compile_timeout: seconds a slow phase may take: a first step, a compile,
            writing a checkpoint.
        label: how the process is named in the message ("process 1 of 2").
        log: where the line goes (stderr).
        end: `code -> None` that ends the process (`os._exit`; tests pass their own).
    """

    def __init__(self, step_timeout, compile_timeout, label="the process", log=None, end=None):
        self.step_timeout = float(step_timeout)
        self.compile_timeout = max(float(compile_timeout), self.step_timeout)
        self.label = label
        self.log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        self.end = end or os._exit
        self.phase, self.slow = "starting", True
        self._last = time.monotonic()
        self._stop = threading.Event()
        self._thread = None

    def beat(self, phase, slow=False):
        """Records progress: the loop is now in `phase`.

        Args:
            phase: a few words for the message, e.g. "in training step 12".
            slow: the phase may take up to `compile_timeout` (a first step, a checkpoint).
        """
        self.phase, self.slow, self._last = phase, slow, time.monotonic()

    def compiling(self, started):
        """A backend compile started (lowering done) or finished: progress, and the phase is slow until the next beat.

        (A compile served from a cache sends no end: the next beat ends the slow phase.)
        """
        self._last = time.monotonic()
        if started:
            self.slow = True

    def limit(self):
        """Seconds the current phase may go without a beat."""
        return self.compile_timeout if self.slow else self.step_timeout

    def check(self, now=None):
        """Ends the process if the current phase has gone without a beat for longer than its limit."""
        waited = (time.monotonic() if now is None else now) - self._last
        if self.step_timeout and waited > self.limit():
            self.log(f"error: {self.label} made no progress for {waited:.0f} s {self.phase}; a peer process "
                     f"may have died or hung (limit {self.limit():g} s: --step-timeout, "
                     "--set train.compile_timeout); stopping")
            self.end(HUNG_EXIT_CODE)

    def _watch(self):
        while not self._stop.wait(min(1.0, max(self.step_timeout / 10, 0.05))):
            self.check()

    def __enter__(self):
        if self.step_timeout:
            _listen_to_compiles()
            _active.append(self)
            self._thread = threading.Thread(target=self._watch, name="keras_tune-watchdog", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self in _active:
            _active.remove(self)
        if self._thread is not None:
            self._thread.join(timeout=5)
        return False


class SigtermGuard:
    """SIGTERM: ask the loop to stop after its step; force the exit when it cannot get there.

    Installed from the main thread (where Python signal handlers live); a no-op
    elsewhere, e.g. a notebook cell run in a worker thread.

    Args:
        grace: seconds the loop has, after a SIGTERM, to reach the end of its step.
        label: how the process is named in the message.
        last_checkpoint: `() -> str` naming the checkpoint a rerun would continue from.
        log: where the line goes (stderr).
        end: `code -> None` that ends the process (`os._exit`).
    """

    def __init__(self, grace, label="the process", last_checkpoint=None, log=None, end=None):
        self.grace = float(grace)
        self.label = label
        self.last_checkpoint = last_checkpoint or (lambda: "none")
        self.log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        self.end = end or os._exit
        self.requested = False
        self.acknowledged = threading.Event()
        self._signals = 0
        self._installed = False

    def _handler(self, signum, frame):
        self.requested = True  # the loop reads it at the end of its step

    def acknowledge(self):
        """The loop reached the end of a step and is stopping: the deadline no longer applies."""
        self.acknowledged.set()

    def _force(self, why):
        self.log(f"stopped: SIGTERM and {self.label} {why}; exiting without a new checkpoint "
                 f"(a rerun continues from {self.last_checkpoint()})")
        self.end(SIGTERM_EXIT_CODE)

    def _wait_for_signals(self, reader):
        while True:
            try:
                data = os.read(reader, 64)
            except OSError:
                return
            if not data:
                return
            for number in data:
                if number != signal.SIGTERM:
                    continue
                self._signals += 1
                if self._signals >= 2:
                    self._force("got a second one")
                    return
                threading.Thread(target=self._deadline, daemon=True).start()

    def _deadline(self):
        if not self.acknowledged.wait(self.grace):
            self._force(f"did not reach the end of its step within {self.grace:g} s")

    def __enter__(self):
        if threading.current_thread() is not threading.main_thread():
            return self
        reader, writer = os.pipe()
        os.set_blocking(writer, False)
        self._pipe = (reader, writer)
        self._previous_handler = signal.signal(signal.SIGTERM, self._handler)
        self._previous_fd = signal.set_wakeup_fd(writer, warn_on_full_buffer=False)
        self._reader = threading.Thread(target=self._wait_for_signals, args=(reader,), name="keras_tune-sigterm",
                                        daemon=True)
        self._reader.start()
        self._installed = True
        return self

    def __exit__(self, *exc):
        if not self._installed:
            return False
        signal.set_wakeup_fd(self._previous_fd)
        signal.signal(signal.SIGTERM, self._previous_handler if self._previous_handler is not None else signal.SIG_DFL)
        reader, writer = self._pipe
        os.close(writer)  # the reader thread reads the end of the pipe and ends
        self._reader.join(timeout=1)
        os.close(reader)
        self._installed = False
        return False
