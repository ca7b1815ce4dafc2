"""The one way the toolkit writes a file: to a temporary file in the same folder, then a rename.

Checkpoints, models, heads, result files, reports (Markdown, CSV), plots, the pipeline's plan, the decode
cache and the generated documentation all go through ``atomic_file``: the bytes go to
``.<name>.<random>.tmp`` beside the target (a rename is atomic only within one file system), are flushed and
fsynced, and only then replace the target, so a kill at any instant leaves the old file or the new one under
the final name, never a torn one. Any failure removes the temporary file; a full disk or another OS error
becomes one sentence naming the folder and the bytes. ``tests/test_structure.py`` fails when a module
writes a file any other way. The one exception is a child process's log (``open_log``), which grows while
the child runs.
"""
import errno
import io
import json
import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch

from dihkit.foundations.errors import UserError

# The process's file-creation mask (reading it means setting it; done once, before any thread starts).
UMASK = os.umask(0)
os.umask(UMASK)
# A temporary file of ``atomic_file``: ``.<name>.`` + mkstemp's 8 random characters + ``.tmp``.
TEMP_FILE = re.compile(r"^\.(?P<name>.+)\.[a-z0-9_]{8}\.tmp$")


def write_error(path: Path, error: OSError, size: int) -> UserError:
    """The sentence for a write that failed; the file that was there before is intact."""
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return UserError(f"no space left in '{path.absolute().parent}' to write '{path.name}' ({size:,} bytes "
                         f"needed); the previous file is kept: free space and run the command again (with "
                         f"--resume to continue the run)")
    return UserError(f"cannot write '{path}': {error.strerror or error}; the previous file is kept")


@contextmanager
def atomic_file(path, size: int | None = None):
    """A binary file to write ``path``'s new content into; it replaces ``path`` when the block ends without an
    error (see the module's docstring). ``size``: the bytes to be written, when known, for a full disk's message
    (otherwise what reached the temporary file)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise write_error(path, e, size or 0) from None
    try:
        # mkstemp creates the file private (0600); give it the permissions any new file of the user gets.
        os.fchmod(fd, 0o666 & ~UMASK)
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        reached = os.path.getsize(tmp) if os.path.exists(tmp) else 0
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError):  # disk full, permissions changed mid-run: the old file is intact
            raise write_error(path, e, size if size is not None else reached) from None
        raise


def atomic_write_bytes(path, data) -> None:
    """Write the bytes ``data`` to ``path`` atomically."""
    with atomic_file(path, len(data)) as f:
        f.write(data)


def atomic_write_text(path, text: str) -> None:
    """Write ``text`` to ``path`` atomically, as UTF-8."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path, obj) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically (values JSON lacks are written as strings)."""
    atomic_write_text(path, json.dumps(obj, indent=2, default=str))


def atomic_torch_save(obj, path) -> None:
    """``torch.save`` ``obj`` to ``path`` atomically. It is serialised in memory first, so its size is known and
    a full disk is an ``OSError`` of the write itself (torch would wrap it in a ``RuntimeError``)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getbuffer())


def atomic_savefig(fig, path, **options) -> None:
    """Save the matplotlib figure ``fig`` to ``path`` atomically, in the format its suffix names."""
    path = Path(path)
    with atomic_file(path) as f:
        fig.savefig(f, format=path.suffix.lstrip(".") or None, **options)


def open_log(path):
    """A text file for a child process's output, opened for writing at ``path``: a log grows while its process
    runs, so it is the one file not replaced atomically (what it holds at any instant is what was said)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return open(path, "w")
