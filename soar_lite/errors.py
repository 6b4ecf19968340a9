"""The one exception type that the CLI turns into a one-line message instead of a traceback."""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user (config, paths, data): print the message, exit 2, no traceback."""


class Interrupted(UserError):
    """A run stopped on purpose (Ctrl-C, the app's Stop): its record says ``stopped``, not ``failed``."""
