"""Errors that the CLI turns into one-line messages and exit codes (2 = usage/data, 1 = check failed; any other
exception is an internal error: exit 3, traceback in a log file)."""


class UserError(Exception):
    """A mistake in the user's input (task, method, model, file, flag): exit code 2, no traceback."""

    exit_code = 2


class CheckFailed(Exception):
    """A comparison or regression check that did not hold: exit code 1."""

    exit_code = 1
