"""Errors that mean the user's input was wrong: the CLI prints them as one line."""


class UserError(Exception):
    """Bad input from the user: a one-line message saying what was received and what was expected."""
