"""One exception type for problems the user can fix (bad config, missing file, ...).

The CLI turns it into a single `qwenjax: error: ...` line and a non-zero exit; library
callers get an ordinary exception with the same message.
"""


class UserError(ValueError):
    """Bad input: the message names the problem and, where possible, the fix."""
