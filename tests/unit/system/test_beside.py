"""Work beside the main one: it runs once what was already beside is done, and stops when asked."""

from __future__ import annotations

import threading

from finetune.system.beside import beside


def test_it_runs_after_the_earlier_work_and_says_what_happened_to_both():
    order, release = [], threading.Event()

    def earlier(cancel):
        release.wait(5)
        order.append(("earlier", cancel))
        return "earlier done"

    finish = beside(lambda stop: order.append("work") or "work done", "t", after=earlier)
    assert order == []  # waits for the earlier work
    release.set()
    assert finish(False) == "earlier done; work done"
    assert (
        order[0] == ("earlier", False) and "work" in order[1:]
    )  # the work ran only once the earlier was done


def test_cancel_sets_stop_and_waits_for_the_work_to_return():
    started = threading.Event()

    def work(stop):
        started.set()
        return "stopped" if stop.wait(5) else "ran out"

    finish = beside(work, "t")
    assert started.wait(5)
    assert finish(True) == "stopped"


def test_a_worker_hands_back_what_its_work_raised():
    import pytest

    from finetune.system.beside import Worker

    def broken():
        raise RuntimeError("the child crashed")

    worker = Worker(broken, "t")
    assert worker.daemon  # a Ctrl-C of the caller is not held up by it
    with pytest.raises(RuntimeError, match="the child crashed"):
        worker.join()
    done = []
    Worker(lambda: done.append(1), "t").join()
    assert done == [1]
