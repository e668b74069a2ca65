"""SIGINT, SIGTERM and SIGHUP all become Interrupted; inside a deferred section they wait for a safe point."""

from __future__ import annotations

import os
import signal

import pytest

from finetune.system import signals


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGHUP, 129)])
def test_each_signal_raises_interrupted_with_its_exit_code(sig, code):
    with signals.handled(), pytest.raises(signals.Interrupted) as err:
        os.kill(os.getpid(), sig)
        for _ in range(1000):  # the handler runs between bytecodes
            pass
    assert err.value.exit_code == code and err.value.name == signal.Signals(sig).name


def test_deferred_signals_wait_for_check_and_a_second_signal_does_not():
    with signals.handled(), signals.deferred():
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(1000):
            pass
        assert signals.pending() == signal.SIGTERM  # recorded, not raised: training reaches its step boundary
        with pytest.raises(signals.Interrupted):
            os.kill(os.getpid(), signal.SIGINT)  # a second one means now
            for _ in range(1000):
                pass
    with signals.handled(), signals.deferred():
        os.kill(os.getpid(), signal.SIGHUP)
        for _ in range(1000):
            pass
        with pytest.raises(signals.Interrupted) as err:
            signals.check()
        assert err.value.signum == signal.SIGHUP and signals.pending() is None


def test_handlers_are_restored_and_keyboard_interrupt_counts_as_sigint():
    before = signal.getsignal(signal.SIGTERM)
    with signals.handled():
        assert signal.getsignal(signal.SIGTERM) is not before
    assert signal.getsignal(signal.SIGTERM) is before
    assert signals.as_interrupted(KeyboardInterrupt()).exit_code == 130
    assert signals.as_interrupted(ValueError()) is None
