"""Errors the CLI turns into one line and an exit code (0 ok, 1 check failed, 2 bad input, 3 internal, 4 refused)."""


class VcompressError(Exception):
    exit_code = 1


class InputError(VcompressError):
    """Bad input: a missing or corrupt checkpoint, wrong format, unknown key. Exit 2.

    The message is one line: what is wrong, then the fix.
    """

    exit_code = 2


class CheckFailed(VcompressError):
    """A budget or a bundle check failed: the verdict on something that exists. Exit 1."""

    exit_code = 1


class Unsupported(VcompressError):
    """A capability that cannot work on this machine (no GPU, no TensorRT). Exit 2."""

    exit_code = 2


class Refused(VcompressError):
    """An export's own gate (parity with PyTorch, TensorRT readiness, the bundle loading) refused what it made:
    no artifact was written, so there is nothing to judge. Exit 4, never 1, which a script reads as a verdict."""

    exit_code = 4


class InternalError(Exception):
    """A bug of ours or of a library that our own check caught (a pruned model that reloads differently, a
    converter or a benchmark that crashed). Not a VcompressError on purpose: the CLI reports it as an internal
    error, exit 3, with the traceback and this message (whose lines after the first may carry a log tail) in a log."""
