"""The one exception type for mistakes a user can make (bad flag, missing file, wrong checkpoint).

The console turns a ``UserError`` into one sentence on stderr and exit code 2; anything else is a bug
and keeps its traceback.
"""
import sys


class UserError(Exception):
    """A problem with the user's input, reported as one sentence and exit code 2."""


def exit_code(action) -> int:
    """Run ``action()`` for a script's ``main``: 0, or for a UserError its sentence on stderr and exit code 2."""
    try:
        action()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
