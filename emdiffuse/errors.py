"""Errors that carry a message meant for the user (the CLI prints it on one line, exit code 2)."""


class InputError(ValueError):
    """Bad input from the user: what is wrong and what to do, in one line."""
