"""Shared tools of the fault tests: a tiny image-folder dataset, a fast recipe, and file-tree snapshots.

The recipe trains on 100 images of 16x16 pixels (4 classes, 20 more held out for validation), three
batches an epoch, so a whole three-epoch run takes a few seconds on a busy CPU.
"""
import os
import re
import signal
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from dihkit.files.checkpoints import safe_load
from console import ROOT, TINY

CLASSES = 4


def make_imagefolder(root: Path, train_per_class: int = 30, test_per_class: int = 10, size: int = 16,
                     label_noise: float = 0.0, spread: float = 40.0, classes: int = CLASSES) -> Path:
    """Write ``root/{train,test}/<class>/<n>.png`` for ``classes`` classes: each class a colour, with noise of
    std ``spread`` (of 255) so that it is learnable.

    With ``label_noise`` that fraction of the training images (drawn by a generator of its own, so the pixels
    are the same with any value) is filed under a class drawn at random, as ``<true class>_<n>.png``.
    """
    rng, relabel = np.random.default_rng(0), np.random.default_rng(1)
    colours = rng.integers(40, 215, size=(classes, 3))
    for split, count in (("train", train_per_class), ("test", test_per_class)):
        for c in range(classes):
            for n in range(count):
                pixels = colours[c] + rng.normal(0, spread, size=(size, size, 3))
                noisy = split == "train" and label_noise and relabel.random() < label_noise
                k = int(relabel.integers(0, classes)) if noisy else c
                folder = root / split / f"class_{k}"
                folder.mkdir(parents=True, exist_ok=True)
                name = f"{n}.png" if k == c else f"{c}_{n}.png"
                Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / name)
    return root


def recipe(data_dir: Path, epochs: int = 3) -> list:
    """Console flags of the fast deterministic CPU recipe on ``data_dir`` (res8 teacher and student).

    Built on TINY (later flags win), so the tiny defaults the other tests rely on apply here too.
    """
    return [*TINY, "--dataset", "imagefolder", "--data_dir", data_dir, "--val_size", "20", "--train_subset", "0",
            "--batch_size", "40", "--epochs", epochs, "--schedule", max(1, epochs - 1), "--seed", "5",
            "--teacher", "res8", "--student", "res8", "--deterministic", "--num_workers", "0"]


def flip_tensor_byte(path: Path) -> None:
    """Invert one byte in the middle of the largest tensor of a torch checkpoint: the file still parses.

    Torch's zip format stores tensors uncompressed, each in a record ``<archive>/data/<n>``; the byte is found
    from the record's local header (30 bytes, then the name and the extra field).
    """
    with zipfile.ZipFile(path) as z:
        record = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    raw = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", raw[record.header_offset + 26:record.header_offset + 30])
    raw[record.header_offset + 30 + name_len + extra_len + record.file_size // 2] ^= 0xFF
    path.write_bytes(bytes(raw))


def hold_lock(path: Path) -> subprocess.Popen:
    """Another live process claiming the output ``path`` (``output_lock``) until it is killed; returns once it
    holds the claim."""
    code = ("import sys, time; from dihkit.files.output_lock import OutputLock; lock = OutputLock([sys.argv[1]]); "
            "lock.acquire(); print('held', flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(path)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def tree(root: Path) -> dict:
    """Every file and folder under ``root``, files with their size and modification time (to prove nothing changed).

    A folder counts by its name only: a run refused while it holds its claim has created and removed its
    lock files there, which changes the folder's time but leaves no file behind.
    """
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = path.stat()
            out[str(path.relative_to(root))] = (True, 0, 0) if path.is_dir() else (False, st.st_size, st.st_mtime_ns)
    return out


def start(args, cwd) -> subprocess.Popen:
    """Start the console in a fresh process (for signals); stdout and stderr are kept.

    One intra-op thread, like the tests' own process (``one_thread``): several processes share this
    machine's cores, and results compared bit for bit must come from the same thread count.
    """
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(ROOT / "final_test.py"), *map(str, args)], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def signalled_run(args, target: str, nth: int, cwd) -> tuple[int, float, str]:
    """(exit code, seconds from the SIGTERM to the exit, stderr) of the console signalled at ``target``'s
    ``nth`` call."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}  # as ``start``
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "signal_at.py"), target, str(nth), *map(str, args)],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    ended = time.time()
    sent = [float(t) for t in re.findall(r"SIGTERM (\d+\.\d+)", proc.stderr)]  # a progress bar may share its line
    assert sent, f"the signal was never sent (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
    return proc.returncode, ended - sent[0], proc.stderr


def wait_for_state(proc: subprocess.Popen, state: Path, timeout: float = 240.0) -> None:
    """Poll until the run's resumable checkpoint appears (the end of its first epoch)."""
    deadline = time.time() + timeout
    while not state.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before its first checkpoint:\n{proc.communicate()[1]}")
        if time.time() > deadline:
            proc.kill()
            raise AssertionError("no checkpoint appeared in time")
        time.sleep(0.01)


def kill_after_first_epoch(args, cwd, state: Path) -> dict:
    """Run the console, SIGKILL it as soon as its epoch-1 checkpoint exists; return that checkpoint."""
    proc = start(args, cwd)
    wait_for_state(proc, state)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    return safe_load(state, "state")
