"""SIGTERM as Ctrl-C, and interrupts held back to a point where stopping is safe (real signals)."""

from __future__ import annotations

import os
import signal

import pytest

from mlwarden.interrupts import Terminated, deferred_interrupts, sigterm_interrupts


def test_sigterm_raises_keyboard_interrupt_and_the_handler_is_put_back() -> None:
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Terminated, match="SIGTERM"), sigterm_interrupts():
        os.kill(os.getpid(), signal.SIGTERM)
    assert signal.getsignal(signal.SIGTERM) == handler


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_deferred_signal_is_raised_at_the_next_stop_point_only(signum: int) -> None:
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    steps = []
    with pytest.raises(KeyboardInterrupt, match=signal.Signals(signum).name), deferred_interrupts() as stop_point:
        stop_point()
        os.kill(os.getpid(), signum)
        steps.append("finished the step the signal came in")
        stop_point()
        steps.append("never")
    assert steps == ["finished the step the signal came in"]
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers


def test_a_signal_still_pending_at_the_end_is_raised_on_leaving() -> None:
    with pytest.raises(KeyboardInterrupt), deferred_interrupts():
        os.kill(os.getpid(), signal.SIGINT)
