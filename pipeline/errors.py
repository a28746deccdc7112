"""The one exception type for user mistakes.

Stage functions raise ``UserError`` for bad input (a missing file, a wrong option, a mismatched
checkpoint). The CLI prints it as a single line and exits with status 2; anything else is a bug
and keeps its traceback.
"""


class UserError(Exception):
    """A mistake the user can fix; the message names the file, key or option at fault."""
