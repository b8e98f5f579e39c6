"""Errors that mean the user's input was wrong: the CLI prints them as one line."""


class UserError(Exception):
    """Bad input from the user: a one-line message saying what was received and what was expected."""


class WriteFailed(UserError):
    """An output could not be written (a full disk, say); what was there before is intact (exit 4)."""

    exit_code = 4


class Preempted(UserError):
    """SIGTERM stopped the run after a checkpoint was written; rerunning continues it (exit 143)."""

    exit_code = 143
    label = "stopped"
