"""The two kinds of error keras_tune raises on purpose, each a one-line message and an exit code.

- `UserError`: the input was wrong (a flag, a file, a preset). Raised before any
  expensive work where it can be; the command-line tools print it as one
  `error:` line and exit with 2.
- `RunFailed`: the input was fine but the run could not go on: the loss became
  NaN (`LossNotFinite`, exit 3), an output could not be written (`WriteFailed`,
  exit 4), a peer process of a multi-process run was lost (`PeerLost`, exit 5;
  a run that stops making progress ends with the same code, from
  `keras_tune.watchdog`), SIGTERM stopped it after a checkpoint (`Preempted`,
  exit 143). What was written before (checkpoints, adapters) is intact, and the
  message says how to continue.

Both derive from `KerasTuneError`, which is what the command-line tools catch.
"""


class KerasTuneError(Exception):
    """An error keras_tune reports as one line: `label: message`, then exit with `exit_code`."""

    exit_code = 2
    label = "error"


class UserError(KerasTuneError):
    """Bad input from the user: a one-line message saying what was received and what was expected (exit 2)."""


class RunFailed(KerasTuneError):
    """A run that started could not finish; what it wrote before is intact."""

    exit_code = 1


class LossNotFinite(RunFailed):
    """The training loss became NaN or infinite; the run stopped, the last good checkpoint is kept (exit 3)."""

    exit_code = 3


class WriteFailed(RunFailed):
    """An output could not be written (a full disk, say); what was there before is intact (exit 4)."""

    exit_code = 4


class PeerLost(RunFailed):
    """A collective failed because a peer process died or lost its connection (exit 5)."""

    exit_code = 5


class Preempted(RunFailed):
    """SIGTERM stopped the run after a checkpoint was written; rerunning continues it (exit 143)."""

    exit_code = 143
    label = "stopped"
