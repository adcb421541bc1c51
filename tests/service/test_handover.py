"""The handover flag: asked once per process, by a call or by the signal a worker's main process
sends its pool processes."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from service import handover
from tests.support.procs import wait_until


@pytest.fixture(autouse=True)
def fresh() -> Iterator[None]:
    handover.reset()
    yield
    handover.reset()


def test_asked_by_a_call_and_forgotten_by_reset() -> None:
    assert not handover.requested()
    handover.request()
    assert handover.requested() and handover.event().is_set()
    handover.reset()
    assert not handover.requested()


def test_asked_by_the_signal_once_installed() -> None:
    import signal

    before = signal.getsignal(handover.SIGNAL)
    try:
        handover.install_signal()
        os.kill(os.getpid(), handover.SIGNAL)
        wait_until(handover.requested, timeout=5, message="the signal to set the flag")
    finally:
        signal.signal(handover.SIGNAL, before)


def test_the_signal_is_neither_sigterm_nor_billiards_soft_time_limit() -> None:
    import signal

    assert handover.SIGNAL not in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


def test_handover_names_what_stopped() -> None:
    exc = handover.Handover("collect job_1:0 at output line 7")
    assert exc.what in str(exc) and "shutting down" in str(exc)
