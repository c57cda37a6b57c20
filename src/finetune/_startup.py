"""Keep TensorFlow's native start-up chatter out of the user's terminal.

TensorFlow 2.21's C++ libraries log a few INFO lines while they load (oneDNN is on, which CPU
instructions the binary uses) before absl's logging is set up, so `TF_CPP_MIN_LOG_LEVEL` does
not reach them (tensorflow/tensorflow#100442). `quiet_native_startup` catches what the process
writes to file descriptor 2 while TensorFlow loads and writes back every line that is not such
an INFO line: warnings and errors still reach the user, only later.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
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
    """Run the body with file descriptor 2 caught; afterwards write back to stderr every
    caught line that `is_startup_noise` does not match (all of it if the body raised).

    Does nothing when `TF_CPP_MIN_LOG_LEVEL` is "0" (the user asked for TensorFlow's INFO
    lines) or when the process has no file descriptor 2.
    """
    if os.environ.get("TF_CPP_MIN_LOG_LEVEL") == "0":
        yield
        return
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):
        yield
        return
    raised = False
    with tempfile.TemporaryFile() as caught:
        os.dup2(caught.fileno(), 2)
        try:
            yield
        except BaseException:
            raised = True
            raise
        finally:
            with contextlib.suppress(Exception):
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            caught.seek(0)
            lines = caught.read().decode("utf-8", errors="replace").splitlines(keepends=True)
            kept = "".join(line for line in lines if raised or not is_startup_noise(line))
            if kept:
                sys.stderr.write(kept)
                sys.stderr.flush()
