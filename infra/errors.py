"""The one exception type the CLI turns into a clear message and exit code 2."""


class UserFacingError(Exception):
    """An error the user can fix: the message says what is wrong and what to do."""
