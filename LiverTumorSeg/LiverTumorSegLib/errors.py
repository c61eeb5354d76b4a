"""Errors the engine raises on purpose: each carries a message for the user and a process exit code.

The command line prints ``str(error)`` without a traceback and exits with ``error.exit_code``.
"""


class LiverTumorSegError(Exception):
    """Base class: a problem the user can act on (the message says what is wrong and what to do)."""

    exit_code = 1


class InputError(LiverTumorSegError):
    """The input image is missing, unreadable or not a CT volume we can process."""

    exit_code = 2


class OutputError(LiverTumorSegError):
    """The output location exists, is not writable, or writing failed."""

    exit_code = 3


class BundleError(LiverTumorSegError):
    """A model bundle is missing, damaged, of an unknown format version, or fails its checksums."""

    exit_code = 4


class DeviceError(LiverTumorSegError):
    """The requested compute device (e.g. ``--device cuda``) is not available here."""

    exit_code = 5


class UsageError(LiverTumorSegError):
    """A command-line option has an invalid value (argparse's own usage errors exit with the same code)."""

    exit_code = 64  # EX_USAGE of sysexits.h


class Cancelled(LiverTumorSegError):
    """Processing was cancelled by the user; nothing was written."""

    exit_code = 130
