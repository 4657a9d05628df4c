"""The errors whose message is meant for the user.

A command-line entry point catches ``UserError`` (and ``OSError`` about a path the user gave, made
readable with ``describe_os_error``), prints ``error: <message>`` and exits non-zero without a
traceback. Anything else is a bug and keeps its traceback. Both classes derive from ``ValueError`` so
that code which catches ``ValueError`` keeps working.
"""

from __future__ import annotations

import errno
import os


class UserError(ValueError):
    """A user or file error: the message names the file or option and says how to fix it."""


class CheckpointError(UserError):
    """A checkpoint is missing, corrupt, hostile, or not of the expected kind."""


_OS_HINTS = {
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "the file system is read-only",
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.ENOENT: "no such file or folder",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EISDIR: "it is a folder",
    errno.EEXIST: "it already exists",
    errno.ENAMETOOLONG: "the name is too long",
}


_WRITE_ERRORS = {errno.EROFS, errno.ENOSPC, errno.EDQUOT}


def describe_os_error(error: OSError, action: str | None = None) -> str:
    """One line for an ``OSError`` about a path: ``cannot <action> <path>: <reason>``."""
    if action is None:
        action = "write to" if error.errno in _WRITE_ERRORS else "access"
    reason = _OS_HINTS.get(error.errno) or error.strerror or str(error)
    path = error.filename if error.filename is not None else "a file"
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    line = f"cannot {action} {path}: {reason}"
    if error.filename2 is not None:
        line += f" (with {error.filename2})"
    return line
