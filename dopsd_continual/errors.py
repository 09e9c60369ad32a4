"""Errors a user can cause: the CLI prints them as one line and exits 1."""


class UserError(Exception):
    """Something the user can fix (a bad path, a bad recipe key, an unknown version)."""


class RoundBusy(UserError):
    """Another round holds the round lock."""
