"""Where results go: a path checked before anything is built or measured (writable, not a
directory), and an existing result refused unless --overwrite. Every command that writes a file
asks here first.
"""

from __future__ import annotations

import os


def check_output_path(
    path: str, key: str = "output.path", example: str = "run.h5", create: bool = True
) -> None:
    """`path` can be written: not a directory, its directory there (or made, with `create`) and
    writable (tried with a probe file), checked before anything is built or measured, so a bad
    location fails at once; ValueError naming `key` otherwise."""
    import tempfile

    if os.path.isdir(path):
        raise ValueError(f"{key}: {path!r} is a directory; expected a file name such as {example}")
    directory = os.path.dirname(os.path.abspath(path))
    if not create and not os.path.isdir(directory):
        raise ValueError(f"{key}: {path!r}: the directory {directory} does not exist; create it first")
    try:
        os.makedirs(directory, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".hpcmoe-probe-"):
            pass
    except OSError as e:
        raise ValueError(f"{key}: {path!r}: cannot write in {directory}: {e.strerror or e}") from None


def check_new_output(path: str | None, overwrite: bool, key: str) -> None:
    """A result is never replaced silently: an existing `path` is refused unless --overwrite.
    A run's `path.tmp` is what a killed job left (resumable): refused alike."""
    if path is None or path == "-" or overwrite:
        return
    for existing, what in ((path, "exists"), (path + ".tmp", "is left by a killed run (--resume reads it)")):
        if key == "output.path" or existing == path:
            if os.path.exists(existing):
                raise ValueError(
                    f"{key}: {existing} {what}; pass --overwrite to replace it, or choose another name"
                )
