"""Run the console with a real SIGTERM sent to itself just before the ``nth`` call of one function: a signal at
a chosen moment of a run (tests/test_signals.py).

    python3 tests/signal_at.py MODULE:QUALNAME N CONSOLE_ARGS...

Just before signalling it writes ``SIGTERM <time.time()>`` on stderr, so the caller can time the stop.
"""
import importlib
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def arm(target: str, nth: int) -> None:
    """Wrap ``MODULE:QUALNAME`` (a function, or a method as ``Class.method``) so that its ``nth`` call first
    sends SIGTERM to this process."""
    module, _, qualname = target.partition(":")
    owner = importlib.import_module(module)
    *path, name = qualname.split(".")
    for part in path:
        owner = getattr(owner, part)
    real, calls = getattr(owner, name), [0]

    def signalled(*args, **kwargs):
        calls[0] += 1
        if calls[0] == nth:
            print(f"SIGTERM {time.time()}", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    setattr(owner, name, signalled)


if __name__ == "__main__":
    arm(sys.argv[1], int(sys.argv[2]))
    import final_test
    sys.exit(final_test.main(sys.argv[3:]))
