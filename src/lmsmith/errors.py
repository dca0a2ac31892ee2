"""Errors that the CLI turns into a one-line message and exit code 2 (never a traceback)."""


class UserError(Exception):
    """Bad input from the user: a recipe field, a file, a record. The message names where."""
