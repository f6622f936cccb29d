"""Factories: choice per platform, Null fallbacks, nothing raised at import."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from donor_app.activity import factory
from donor_app.activity.factory import make_host_sensor, make_idle_counter, make_input_listener
from donor_app.activity.host import PsutilFunctions, PsutilHostSensor
from donor_app.activity.idle_logind import LogindIdleCounter
from donor_app.activity.input_pynput import (
    BackendListener,
    Handlers,
    ListenerFactory,
    PynputInputListener,
)
from donor_app.activity.null import NullHostSensor, NullIdleCounter, NullInputListener
from donor_app.activity.ports import IdleCounter


def _no_listeners(_handlers: Handlers) -> Sequence[BackendListener]:
    return []


def _loader_ok() -> ListenerFactory:
    return _no_listeners


def _loader_failing() -> ListenerFactory:
    raise ImportError("this platform is not supported: no DISPLAY")


def test_input_listener_without_display_is_null(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO")
    listener = make_input_listener(platform="linux", environ={}, loader=_loader_ok)
    assert isinstance(listener, NullInputListener)
    assert "input listener: none" in caplog.text


def test_input_listener_falls_back_when_pynput_cannot_load(
    caplog: pytest.LogCaptureFixture,
) -> None:
    listener = make_input_listener(
        platform="linux", environ={"DISPLAY": ":1"}, loader=_loader_failing
    )
    assert isinstance(listener, NullInputListener)
    assert "pynput unusable: ImportError" in caplog.text


def test_input_listener_is_pynput_where_it_loads(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO")
    assert isinstance(
        make_input_listener(platform="linux", environ={"DISPLAY": ":1"}, loader=_loader_ok),
        PynputInputListener,
    )
    # Windows and macOS need no DISPLAY.
    assert isinstance(
        make_input_listener(platform="win32", environ={}, loader=_loader_ok),
        PynputInputListener,
    )
    assert "input listener: pynput" in caplog.text


def test_input_listener_under_xwayland_warns(caplog: pytest.LogCaptureFixture) -> None:
    environ = {"DISPLAY": ":0", "WAYLAND_DISPLAY": "wayland-0"}
    make_input_listener(platform="linux", environ=environ, loader=_loader_ok)
    assert "XWayland" in caplog.text


_CHOOSE_LISTENER = (
    "import donor_app.activity.factory as f; print(type(f.make_input_listener()).__name__)"
)


@pytest.mark.skipif(sys.platform != "linux", reason="pynput's X11 backend")
@pytest.mark.parametrize("display", [None, ":4242"])
def test_real_pynput_import_failure_falls_back(display: str | None) -> None:
    # In a fresh interpreter, so that no earlier test has imported pynput: with no
    # DISPLAY, or one nobody serves, the factory answers Null and nothing raises.
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    if display is not None:
        env["DISPLAY"] = display
    result = subprocess.run(
        [sys.executable, "-c", _CHOOSE_LISTENER],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "NullInputListener"


def test_importing_every_module_raises_nothing_anywhere() -> None:
    modules = [
        "ports",
        "null",
        "merge",
        "factory",
        "host",
        "input_pynput",
        "idle_x11",
        "idle_logind",
        "idle_windows",
        "idle_macos",
        "sensor_errors",
    ]
    code = "; ".join(f"import donor_app.activity.{name}" for name in modules)
    code += "; import sys; assert 'pynput' not in sys.modules, 'pynput imported eagerly'"
    env = {k: v for k, v in os.environ.items() if k != "DISPLAY"}
    result = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr


class Counter:
    def __init__(self, answer: float | None) -> None:
        self.answer = answer
        self.closed = False

    def seconds_since_last_input(self) -> float | None:
        return self.answer

    def close(self) -> None:
        self.closed = True


def _raising() -> IdleCounter:
    raise OSError("libXss.so.1: cannot open shared object file")


def test_idle_counter_takes_the_first_that_answers(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO")
    silent, working = Counter(None), Counter(3.0)
    candidates: list[tuple[str, Callable[[], IdleCounter]]] = [
        ("broken", _raising),
        ("silent", lambda: silent),
        ("working", lambda: working),
    ]

    assert make_idle_counter(candidates=candidates) is working
    assert silent.closed
    assert "idle counter broken unavailable: OSError" in caplog.text
    assert "idle counter: working" in caplog.text


def test_idle_counter_falls_back_to_null(caplog: pytest.LogCaptureFixture) -> None:
    assert isinstance(make_idle_counter(candidates=[("broken", _raising)]), NullIdleCounter)
    assert "idle counter: none" in caplog.text


def _names(platform: str, environ: dict[str, str]) -> list[str]:
    return [name for name, _ in factory._idle_candidates(platform, environ)]


def test_idle_candidates_per_platform() -> None:
    assert _names("win32", {}) == ["GetLastInputInfo"]
    assert _names("darwin", {}) == ["CGEventSource"]
    assert _names("linux", {"DISPLAY": ":0"}) == ["X11 screensaver", "logind"]
    assert _names("linux", {}) == ["logind"]
    # XWayland's screensaver timer misses Wayland input: never trust it there.
    assert _names("linux", {"DISPLAY": ":0", "WAYLAND_DISPLAY": "wayland-0"}) == ["logind"]
    assert _names("linux", {"DISPLAY": ":0", "XDG_SESSION_TYPE": "wayland"}) == ["logind"]


def _busctl_on_path(monkeypatch: pytest.MonkeyPatch, bindir: Path, script: str | None) -> None:
    """PATH holds only `bindir`, with a `busctl` running `script` (none if None)."""
    bindir.mkdir()
    if script is not None:
        busctl = bindir / "busctl"
        busctl.write_text(f"#!/bin/sh\n{script}\n")
        busctl.chmod(0o755)
    monkeypatch.setenv("PATH", str(bindir))


def test_idle_counter_without_a_system_bus_is_null(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A headless Linux box without systemd (containers, CI): busctl is installed but
    # nothing serves the system bus. The logind counter is built, its first query fails,
    # and the factory hands out the Null counter instead (it does not raise).
    caplog.set_level("INFO")
    _busctl_on_path(
        monkeypatch, tmp_path / "bin", "echo 'Failed to connect to bus: No such file' >&2; exit 1"
    )
    counter = make_idle_counter(platform="linux", environ={})
    assert isinstance(counter, NullIdleCounter)
    assert "idle counter logind unavailable: its first query failed" in caplog.text
    assert "idle counter: none" in caplog.text


def test_idle_counter_without_busctl_is_null(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO")
    _busctl_on_path(monkeypatch, tmp_path / "bin", None)
    counter = make_idle_counter(platform="linux", environ={})
    assert isinstance(counter, NullIdleCounter)
    assert "idle counter logind unavailable: OSError: busctl not found" in caplog.text


def test_idle_counter_is_logind_where_it_answers(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # No display and no login session (a system service): the counter asks logind's
    # Manager, which is idle only when every session is. This busctl answers only that.
    script = '[ "$3" = /org/freedesktop/login1 ] || exit 2\nprintf "b true\\nt 1\\n"'
    _busctl_on_path(monkeypatch, tmp_path / "bin", script)
    counter = make_idle_counter(platform="linux", environ={})
    assert isinstance(counter, LogindIdleCounter)
    idle = counter.seconds_since_last_input()
    assert idle is not None and idle > 0  # idle since 1 µs after boot


def test_host_sensor_is_psutil(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO")
    sensor = make_host_sensor(lambda: [])
    assert isinstance(sensor, PsutilHostSensor)
    assert sensor.read().cpu_count >= 1
    assert "host sensor: psutil" in caplog.text


def test_host_sensor_falls_back_to_null(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken() -> PsutilFunctions:
        raise ImportError("no psutil for this platform")

    monkeypatch.setattr(PsutilFunctions, "system", broken)
    sensor = make_host_sensor(lambda: [])
    assert isinstance(sensor, NullHostSensor)
    assert sensor.read().owner_cpu_percent == 0.0
