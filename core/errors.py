"""Errors the CLI turns into one line and an exit code (0 ok, 1 check failed, 2 bad input)."""


class VcompressError(Exception):
    exit_code = 1


class InputError(VcompressError):
    """Bad input: a missing or corrupt checkpoint, wrong format, unknown key. Exit 2.

    The message is one line: what is wrong, then the fix.
    """

    exit_code = 2


class CheckFailed(VcompressError):
    """A budget, parity or quality check failed. Exit 1."""

    exit_code = 1


class Unsupported(VcompressError):
    """A capability that cannot work on this machine (no GPU, no TensorRT). Exit 2."""

    exit_code = 2
