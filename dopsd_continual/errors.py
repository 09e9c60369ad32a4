"""Errors a user can cause: the CLI prints them as one line and exits 1."""


class UserError(Exception):
    """Something the user can fix (a bad path, a bad recipe key, an unknown version)."""


class RoundBusy(UserError):
    """Another round holds the round lock."""


class DoesNotFit(UserError):
    """The recipe's round needs more GPU memory than this card (or its budget) has: refused before loading."""
