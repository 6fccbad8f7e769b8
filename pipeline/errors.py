"""One exception type for everything the user can fix.

The CLI catches `UserError` and prints its message alone (no traceback) with a non-zero exit,
so every message must name the file or key at fault and say what to do about it.
"""


class UserError(Exception):
    """Bad input the user can fix: the message names the file/key and the fix."""
