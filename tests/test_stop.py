"""amid.stop: the first SIGINT/SIGTERM is a request to stop at a safe point, a later Ctrl-C stops at once."""

from __future__ import annotations

import os
import signal

import pytest

import amid.stop
from amid.stop import Interrupted, StopRequest


@pytest.fixture(autouse=True)
def handlers_put_back():
    """Each test leaves SIGINT/SIGTERM as it found them (a stop leaves a handler for late repeats)."""
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for s, handler in before.items():
        signal.signal(s, handler)


def _send(signum: int) -> None:
    os.kill(os.getpid(), signum)  # Python runs the handler before the next bytecode of this thread


def test_the_first_signal_is_a_request_and_repeats_within_the_window_are_the_same_one():
    said: list[str] = []
    with StopRequest("stopping soon", say=said.append) as stop:
        assert not stop.requested
        _send(signal.SIGTERM)
        assert stop.requested and stop.signum == signal.SIGTERM and said == ["stopping soon"]
        _send(signal.SIGINT)  # e.g. torchrun forwarding the terminal's Ctrl-C a moment later
        _send(signal.SIGTERM)
        assert stop.signum == signal.SIGTERM and said == ["stopping soon"]
    _send(signal.SIGINT)  # a repeat arriving once the job has stopped, still within the window
    _send(signal.SIGTERM)


def test_after_the_window_signals_reach_the_handlers_from_before(monkeypatch):
    import time

    monkeypatch.setattr(amid.stop, "STOP_WINDOW_S", 0.05)
    with StopRequest() as stop:
        _send(signal.SIGINT)
        assert stop.requested
    time.sleep(0.1)
    with pytest.raises(KeyboardInterrupt):
        _send(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    with StopRequest() as stop:  # without a request the handlers are put back as they were
        pass
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_later_ctrl_c_stops_at_once_and_a_later_sigterm_does_not(monkeypatch):
    monkeypatch.setattr(amid.stop, "STOP_WINDOW_S", 0.0)
    with StopRequest() as stop:
        _send(signal.SIGINT)
        assert stop.signum == signal.SIGINT
        _send(signal.SIGTERM)  # a scheduler repeating itself: still the one request
        with pytest.raises(KeyboardInterrupt):
            _send(signal.SIGINT)


def test_interrupted_is_a_keyboard_interrupt_with_the_shells_exit_status():
    exc = Interrupted("saved", signal.SIGTERM)
    assert isinstance(exc, KeyboardInterrupt) and not isinstance(exc, Exception)  # no `except Exception` takes it
    assert exc.exit_code == 143 and Interrupted("saved").exit_code == 130 and str(exc) == "saved"


def test_the_cli_reports_an_interruption_in_one_line_with_the_signals_exit_status(monkeypatch, tmp_path):
    from click.testing import CliRunner

    import amid.teacher
    from amid.cli import main

    def interrupted(*_args, **_kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(amid.teacher, "cache_teacher", interrupted)
    res = CliRunner().invoke(main, ["cache-teacher", "--teacher", "t", "--data", "d", "--out", str(tmp_path / "c")])
    assert res.exit_code == 130 and "Traceback" not in res.output
    assert res.output.strip().splitlines()[-1] == (
        "Stopped: interrupted; the finished shards are kept: rerun the same command to continue")

    def saved(*_args, **_kw):
        raise Interrupted("SIGTERM at step 5 of 8: checkpoint saved", signal.SIGTERM)

    monkeypatch.setattr(amid.teacher, "cache_teacher", saved)
    res = CliRunner().invoke(main, ["cache-teacher", "--teacher", "t", "--data", "d", "--out", str(tmp_path / "c")])
    assert res.exit_code == 143 and res.output.strip().splitlines()[-1] == "Stopped: SIGTERM at step 5 of 8: checkpoint saved"


def test_a_signal_ignored_by_whoever_started_the_job_stays_ignored():
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # as a shell starts `amid train ... &`
    with StopRequest() as stop:
        _send(signal.SIGINT)  # the terminal's Ctrl-C meant for the script
        assert not stop.requested
        _send(signal.SIGTERM)
        assert stop.requested
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
