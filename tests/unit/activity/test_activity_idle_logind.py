"""logind idle: parsing busctl's output and the arithmetic, with injected I/O."""

from __future__ import annotations

import sys
from collections.abc import Sequence

import pytest

from donor_app.activity import idle_logind
from donor_app.activity.idle_logind import (
    MANAGER,
    SESSION,
    IdleHint,
    LogindIdleCounter,
    busctl_command,
    idle_seconds,
    parse_idle_hint,
)


def test_parse_idle_and_not_idle() -> None:
    assert parse_idle_hint("b true\nt 123456789\n") == IdleHint(True, 123456789)
    assert parse_idle_hint("b false\nt 0\n") == IdleHint(False, 0)


@pytest.mark.parametrize(
    "output",
    [
        "",
        "b true\n",
        "b maybe\nt 1\n",
        "s true\nt 1\n",
        "b true\nt -1\n",
        "b true\nu 1\n",
        "b true\nt 1\nt 2\n",
        "b true extra\nt 1\n",
    ],
)
def test_parse_rejects_anything_else(output: str) -> None:
    with pytest.raises(ValueError):
        parse_idle_hint(output)


def test_idle_seconds_counts_from_the_hint_only_while_idle() -> None:
    assert idle_seconds(IdleHint(True, 1_000_000), now_monotonic_us=4_500_000) == 3.5
    assert idle_seconds(IdleHint(False, 1_000_000), now_monotonic_us=4_500_000) == 0.0
    # A hint stamped after our clock read (they race) is not negative idleness.
    assert idle_seconds(IdleHint(True, 5_000_000), now_monotonic_us=4_500_000) == 0.0


def test_command_asks_for_both_properties_of_the_target() -> None:
    assert busctl_command(SESSION)[-4:] == [
        "/org/freedesktop/login1/session/auto",
        "org.freedesktop.login1.Session",
        "IdleHint",
        "IdleSinceHintMonotonic",
    ]
    assert busctl_command(MANAGER)[3:5] == [
        "/org/freedesktop/login1",
        "org.freedesktop.login1.Manager",
    ]


def test_counter_runs_busctl_and_answers_seconds() -> None:
    commands: list[Sequence[str]] = []

    def run(command: Sequence[str]) -> str:
        commands.append(command)
        return "b true\nt 2000000\n"

    counter = LogindIdleCounter(MANAGER, run=run, monotonic_us=lambda: 62_000_000)

    assert counter.seconds_since_last_input() == 60.0
    assert commands == [busctl_command(MANAGER)]
    counter.close()


def test_counter_answers_none_on_failure_and_bad_output(
    caplog: pytest.LogCaptureFixture,
) -> None:
    answers: list[str | OSError] = [OSError("no bus"), "garbage", "b false\nt 0\n"]

    def run(_command: Sequence[str]) -> str:
        answer = answers.pop(0)
        if isinstance(answer, OSError):
            raise answer
        return answer

    counter = LogindIdleCounter(run=run, monotonic_us=lambda: 1)

    assert counter.seconds_since_last_input() is None
    assert counter.seconds_since_last_input() is None
    assert counter.seconds_since_last_input() == 0.0
    assert caplog.text.count("failed") == 1


def test_run_busctl_returns_stdout_and_raises_oserror_on_failure() -> None:
    assert idle_logind.run_busctl([sys.executable, "-c", "print('b true')"]) == "b true\n"
    with pytest.raises(OSError, match="exited 3"):
        idle_logind.run_busctl([sys.executable, "-c", "raise SystemExit(3)"])
    with pytest.raises(OSError):
        idle_logind.run_busctl(["/nonexistent/busctl"])


def test_run_busctl_times_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(idle_logind, "BUSCTL_TIMEOUT_S", 0.2)
    with pytest.raises(OSError, match="timed out"):
        idle_logind.run_busctl([sys.executable, "-c", "import time; time.sleep(30)"])
