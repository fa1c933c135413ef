"""The exceptions smptrain raises for a user's mistake.

A `UserError` is a mistake the user can fix (a wrong key, a missing file, an impossible split): its message is one
sentence naming the file, key or value and what was expected. The command-line entry points print it and exit with
status 2, without a traceback (`smptrain.cli.report_user_errors`); everything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input: its message names the file, key or value and what was expected."""


class CannotBuild(UserError):
    """The configured model cannot be built or cannot take the run's patches (architecture, encoder and patch size
    together); cross-validation and tuning record it as a failed trial and go on."""
