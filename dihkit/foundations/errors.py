"""The one exception type for mistakes a user can make (bad flag, missing file, wrong checkpoint).

The console turns a ``UserError`` into one sentence on stderr and exit code 2; anything else is a bug
and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input, reported as one sentence and exit code 2."""
