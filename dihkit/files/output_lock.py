"""The claim a run holds on its outputs for its whole life: an exclusive ``flock`` on a lock file beside each.

Beside every file (or heads folder) a run writes, a lock file ``.<name>.lock`` holds the PID of the run that
claims it. The lock is the kernel's and ends with the process however it ends (SIGKILL included), so a killed
run's ``--resume`` needs no cleanup: a lock file nobody holds means nothing. A second run on any of the same
outputs is refused at once, naming the first one's PID. Releasing the claim (any exit the process survives)
removes the lock files, while still holding them, and the folders the claim created that stayed empty.
"""
import fcntl
import os
from pathlib import Path

from dihkit.files.atomic_files import TEMP_FILE
from dihkit.foundations.errors import UserError

def lock_file(path: Path) -> Path:
    """The lock file that claims ``path``: ``.<name>.lock`` in the same folder."""
    return path.with_name(f".{path.name}.lock")


def claimed(path: Path, pid: str) -> UserError:
    """The refusal of a run whose output another live run holds."""
    return UserError(f"output '{path}' is claimed by another run that is still going (PID {pid}); wait for it to "
                     f"end or choose another --path_to_save")


def recorded_pid(fd: int) -> str:
    """The PID written in an open lock file ('unknown' when it holds none)."""
    text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    return text if text.isdigit() else "unknown"


def holder(path: Path) -> str | None:
    """The PID of a live run claiming ``path``, or None; only reads (no lock file is created).

    A free lock file is locked shared for an instant; a run that tries to claim it in that instant is
    refused as if another run held it, which at worst makes a racing start fail and leaves nothing behind.
    """
    try:
        fd = os.open(lock_file(path), os.O_RDONLY)
    except OSError:  # no lock file (or none readable): nobody can hold it
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return None
    except BlockingIOError:
        return recorded_pid(fd)
    finally:
        os.close(fd)  # also ends the shared lock


def lock_one(path: Path) -> int:
    """Lock ``path``'s lock file exclusively and write this process's PID in it; return its descriptor."""
    lock = lock_file(path)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = recorded_pid(fd)
            os.close(fd)
            raise claimed(path, pid) from None
        # The holder removes its lock file before letting go of it: a lock obtained on a file that was removed
        # in between claims nothing, so try again on the file now at that name.
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(lock))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


class OutputLock:
    """Exclusive claims on a set of output paths, taken together and held until ``release``."""

    def __init__(self, paths):
        self.paths = list(dict.fromkeys(Path(p) for p in paths))
        self.held = {}   # lock file -> open descriptor
        self.made = []   # folders created to hold lock files, outermost first

    def check_free(self) -> None:
        """Refuse, without writing anything, when a live run claims any of the paths."""
        for path in self.paths:
            pid = holder(path)
            if pid is not None:
                raise claimed(path, pid)

    def acquire(self) -> None:
        """Claim every path, creating the folders the lock files need; on any refusal, let go of all."""
        try:
            for path in self.paths:
                self.make_folder(path.parent)
                self.held[lock_file(path)] = lock_one(path)
        except OSError as e:
            self.release()
            raise UserError(f"cannot claim the outputs in '{path.parent}': {e.strerror or e}") from None
        except BaseException:
            self.release()
            raise

    def make_folder(self, folder: Path) -> None:
        """Create ``folder`` and its missing parents, remembering them for ``release``."""
        missing = []
        while not folder.exists():
            missing.append(folder)
            folder = folder.parent
        for folder in reversed(missing):
            try:
                folder.mkdir()
            except FileExistsError:  # another process created it meanwhile: not ours to remove
                continue
            self.made.append(folder)

    def release(self) -> None:
        """Remove each lock file while holding it, let go of it, and remove the created folders left empty."""
        for lock, fd in self.held.items():
            lock.unlink(missing_ok=True)
            os.close(fd)
        self.held = {}
        for folder in reversed(self.made):
            try:
                folder.rmdir()
            except OSError:  # the run wrote into it: keep it
                pass
        self.made = []


def remove_stray_temps(path: Path, inside: bool) -> list[Path]:
    """Remove the temporary files a killed write left for ``path`` (``.<name>.<random>.tmp`` beside it; with
    ``inside``, a heads folder's: every one in it and in its ``best`` folder); return them.

    Only a run that holds the claim on ``path`` may call it: nothing else writes these files then.
    """
    found = []
    for folder in (path, path / "best") if inside else (path.parent,):
        if folder.is_dir():
            for p in folder.iterdir():
                m = TEMP_FILE.match(p.name)
                if m and (inside or m["name"] == path.name):
                    found.append(p)
    for p in found:
        p.unlink(missing_ok=True)
    return found
