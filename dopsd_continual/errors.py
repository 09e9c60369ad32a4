"""Errors a user can cause: the CLI prints them as one line and exits 1."""


class UserError(Exception):
    """Something the user can fix (a bad path, a bad recipe key, an unknown version)."""


class RoundBusy(UserError):
    """Another round holds the round lock."""


class DoesNotFit(UserError):
    """The recipe's round needs more GPU memory than this card (or its budget) has: refused before loading."""


class DiskFull(UserError):
    """The state's file system cannot take what a round or a scan needs: `need` bytes, `free` bytes."""

    def __init__(self, message: str, need: int = 0, free: int = 0):
        super().__init__(message)
        self.need, self.free = need, free


class ModelBusy(Exception):
    """The model is in a round or drawing another picture, for a request that would not wait."""
