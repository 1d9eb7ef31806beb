"""Errors a user can fix. The CLI prints them as one paragraph and exits with code 2."""


class UserError(Exception):
    """Bad input: the message names the problem and the fix."""


class CompressionShortfall(UserError):
    """A method achieved far less compression than requested (DESIGN.md: a failed run, not a good score)."""
