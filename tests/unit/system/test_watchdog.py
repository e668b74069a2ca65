"""The watchdog script kills a group when its parent dies (zombie included) and leaves it alone otherwise."""

from __future__ import annotations

import subprocess
import sys
import time

from finetune.system import procs

WATCHDOG = [sys.executable, "-I", str(procs.WATCHDOG)]


def test_it_exits_quietly_when_the_guarded_group_ends_first():
    child = subprocess.Popen([sys.executable, "-c", "pass"], start_new_session=True)
    child.wait()
    dog = subprocess.run([*WATCHDOG, str(1), str(child.pid)], timeout=10)
    assert dog.returncode == 0


def test_it_kills_the_group_of_a_dead_parent_even_while_the_parent_is_an_unreaped_zombie():
    parent = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(0.5)"]
    )  # we never reap it early
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    dog = subprocess.Popen([*WATCHDOG, str(parent.pid), str(child.pid)])
    time.sleep(1.5)  # parent exited: a zombie until we wait() it
    assert child.wait(timeout=15) != 0, "the child should have been killed"
    assert dog.wait(timeout=15) == 0
    parent.wait()


def test_it_leaves_the_group_alone_while_the_parent_lives():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    dog = subprocess.Popen([*WATCHDOG, str(subprocess.os.getpid()), str(child.pid)])
    try:
        time.sleep(1.0)
        assert child.poll() is None and dog.poll() is None
    finally:
        child.kill()
        child.wait()
        assert dog.wait(timeout=10) == 0
