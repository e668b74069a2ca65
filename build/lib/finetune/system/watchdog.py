"""Kill a child's process group once its parent is gone: `python -I watchdog.py PARENT_PID CHILD_PID`.

A standalone script (stdlib only, no package import) started in its own session by procs.spawn_guarded,
so neither Ctrl-C to the terminal nor SIGKILL of the parent stops it before it has cleaned up.
"""

import os
import signal
import sys
import time


def _alive(pid: int) -> bool:
    if os.path.isdir("/proc/self"):
        try:
            with open(
                f"/proc/{pid}/stat"
            ) as fh:  # a killed parent nobody reaped yet is a zombie: gone for us
                return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
        except FileNotFoundError:
            return False
        except (OSError, IndexError):
            pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def main(parent: int, child: int) -> int:
    while True:
        if not _group_alive(child):
            return 0  # the child's group ended on its own: nothing to guard
        if not _alive(parent):
            break
        time.sleep(0.2)
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(child, sig)
        except ProcessLookupError:
            return 0
        deadline = time.monotonic() + wait
        while _group_alive(child) and time.monotonic() < deadline:
            time.sleep(0.1)
    return 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]), int(sys.argv[2])))
