"""The real input listener and X11 idle counter under Xvfb, driven by xdotool.

Needs Xvfb and xdotool (CI installs them): missing ones fail the test, they do not skip
it. Skipped only off Linux.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

from donor_app.activity.factory import make_idle_counter, make_input_listener
from donor_app.activity.idle_x11 import X11IdleCounter
from donor_app.activity.input_pynput import PynputInputListener
from tests.waiting import wait_for
from tests.xvfb import running_xvfb

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="X11 / Xvfb is Linux-only here")

DEADLINE_S = 10.0


@pytest.fixture
def display(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A private Xvfb; DISPLAY points at it for this test only."""
    with running_xvfb() as name:
        monkeypatch.setenv("DISPLAY", name)
        monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
        monkeypatch.delenv("XDG_SESSION_TYPE", raising=False)
        yield name


def xdotool(*args: str) -> None:
    subprocess.run(["xdotool", *args], check=True, timeout=DEADLINE_S)


class Callbacks:
    """Counts on_input calls (made on pynput's threads)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._count = 0

    def __call__(self) -> None:
        with self._lock:
            self._count += 1

    @property
    def count(self) -> int:
        with self._lock:
            return self._count


def test_pynput_listener_sees_keys_moves_and_clicks(display: str) -> None:
    listener = make_input_listener()
    assert isinstance(listener, PynputInputListener)
    callbacks = Callbacks()
    listener.start(callbacks)
    try:
        # The move first: a move within 50 ms of another callback would be coalesced.
        xdotool("mousemove", "10", "10")
        wait_for(
            lambda: callbacks.count >= 1 and listener.event_count() >= 1,
            DEADLINE_S,
            "a move",
        )

        calls, events = callbacks.count, listener.event_count()
        xdotool("key", "--delay", "0", "a")  # press notifies, release only counts
        wait_for(lambda: callbacks.count >= calls + 1, DEADLINE_S, "the key's callback")
        wait_for(
            lambda: listener.event_count() >= events + 2,
            DEADLINE_S,
            "key press and release",
        )

        calls, events = callbacks.count, listener.event_count()
        clicked_at = datetime.now(UTC)
        xdotool("click", "--delay", "0", "1")  # press and release both notify
        wait_for(lambda: callbacks.count >= calls + 2, DEADLINE_S, "click callbacks")
        wait_for(lambda: listener.event_count() >= events + 2, DEADLINE_S, "click events")
        # The click's time, not the key's (seen before the click was sent); 1 ms for the
        # wall time being derived from the monotonic clock.
        last_input = listener.last_input()
        assert last_input is not None
        assert last_input >= clicked_at - timedelta(milliseconds=1)
    finally:
        listener.stop()

    # stop() ended pynput's threads (it would otherwise linger until the next event).
    assert not [t for t in threading.enumerate() if type(t).__module__.startswith("pynput")]
    # Only a time and counters are kept: no key, button, position or pynput object.
    for name, value in vars(listener).items():
        assert not type(value).__module__.startswith("pynput"), name
        assert not isinstance(value, str | tuple | list | dict) or not value, name


def test_x11_idle_counter_resets_on_input(display: str) -> None:
    counter = make_idle_counter()
    assert isinstance(counter, X11IdleCounter)
    try:

        def idle() -> float:
            seconds = counter.seconds_since_last_input()
            assert seconds is not None
            return seconds

        wait_for(
            lambda: idle() >= 0.3,
            DEADLINE_S,
            "the X server to be idle for a moment",
        )
        before = idle()
        xdotool("mousemove", "200", "200")
        # The counter grows again from the reset: checking it once more after the wait
        # could see it past `before` on a stalled runner.
        wait_for(lambda: idle() < before, DEADLINE_S, "the idle time to reset")
    finally:
        counter.close()


_SURVIVOR = textwrap.dedent(
    """
    import sys
    from donor_app.activity.idle_x11 import X11IdleCounter
    counter = X11IdleCounter.open()
    print(counter.seconds_since_last_input() is not None, flush=True)
    sys.stdin.readline()  # the test stops the X server meanwhile
    print(counter.seconds_since_last_input(), counter.seconds_since_last_input(), flush=True)
    counter.close()
    print("alive", flush=True)
    """
)


def test_losing_the_x_server_does_not_exit_the_process() -> None:
    # Xlib's default is exit(1) on a lost connection; run in a child so that a
    # regression fails this test instead of killing pytest.
    with running_xvfb() as name:
        env = {**os.environ, "DISPLAY": name}
        child = subprocess.Popen(
            [sys.executable, "-c", _SURVIVOR],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "True"
    try:
        out, err = child.communicate("go\n", timeout=DEADLINE_S)
    finally:
        child.kill()
    assert child.returncode == 0, err
    assert out.splitlines() == ["None None", "alive"]
    assert "X connection lost" in err
