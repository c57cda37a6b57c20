"""Keep TensorFlow's native start-up chatter out of the user's terminal.

TensorFlow 2.21's C++ libraries log a few INFO lines while they load (oneDNN is on, which CPU
instructions the binary uses) before absl's logging is set up, so `TF_CPP_MIN_LOG_LEVEL` does
not reach them (tensorflow/tensorflow#100442). `quiet_native_startup` passes what the process
writes to file descriptor 2 while TensorFlow loads through a pipe and drops only those INFO
lines: warnings and errors reach the user as they are written.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import threading
from collections.abc import Iterator

# absl's INFO prefix ("I0000 00:00:1795493648.210184   23486 port.cc:153] ..."), the warning
# that logging is not set up yet, and the second line of TensorFlow's CPU-features message.
_NOISE = re.compile(
    r"^(I\d{4} \d\d:\d\d:\d+\.\d+\s+\d+ [\w./-]+:\d+\] "
    r"|WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    r"|To enable the following instructions: .*rebuild TensorFlow with the appropriate compiler)"
)


def is_startup_noise(line: str) -> bool:
    """Whether `line` is one of the INFO lines TensorFlow's native code logs while it loads."""
    return bool(_NOISE.match(line))


@contextlib.contextmanager
def quiet_native_startup() -> Iterator[None]:
    """Run the body with file descriptor 2 sent through a pipe: a thread writes each line
    that `is_startup_noise` does not match to the real stderr as it comes, and drops the
    others, which are written too if the body raises. (A fatal error that aborts the process
    at once may be lost: the thread may not run before the process ends.)

    Does nothing when `TF_CPP_MIN_LOG_LEVEL` is "0" (the user asked for TensorFlow's INFO
    lines) or when file descriptor 2 cannot be duplicated or a pipe made.
    """
    if os.environ.get("TF_CPP_MIN_LOG_LEVEL") == "0":
        yield
        return
    with contextlib.suppress(Exception):
        sys.stderr.flush()
    saved = pipe = None
    with contextlib.suppress(OSError):  # no file descriptor 2, or no pipe to be had
        saved = os.dup(2)
        pipe = os.pipe()
    if saved is None or pipe is None:
        if saved is not None:
            os.close(saved)
        yield  # (outside the `except`: an error of the body is not chained to this one)
        return
    read_end, write_end = pipe
    dropped: list[bytes] = []

    def forward() -> None:
        with os.fdopen(read_end, "rb") as lines:
            for line in lines:
                if is_startup_noise(line.decode("utf-8", errors="replace")):
                    dropped.append(line)
                else:
                    _write_all(saved, line)

    thread = threading.Thread(target=forward, name="finetune-stderr", daemon=True)
    thread.start()
    os.dup2(write_end, 2)
    os.close(write_end)
    raised = False
    try:
        yield
    except BaseException:
        raised = True
        raise
    finally:
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        os.dup2(saved, 2)  # closes the pipe's last write end: the thread reads to its end
        thread.join(timeout=10)
        if raised and dropped:
            _write_all(2, b"".join(dropped))
        os.close(saved)


def _write_all(fd: int, data: bytes) -> None:
    with contextlib.suppress(OSError):
        while data:
            data = data[os.write(fd, data) :]


def import_tensorflow_quietly() -> None:
    """`import tensorflow` inside `quiet_native_startup`, when nothing has imported it yet
    (after that its lines are written, or were filtered by whoever loaded it first)."""
    if "tensorflow" in sys.modules:
        return
    with quiet_native_startup():
        import tensorflow  # noqa: F401
