"""PynputInputListener with a fake backend: counting, coalescing, privacy, lifecycle."""

from __future__ import annotations

import threading
import types
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta

import pytest

from donor_app.activity.input_pynput import BackendListener, Handlers, PynputInputListener

WALL = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class FakeListener:
    """Stands in for a pynput listener: keeps the handlers so the test can fire events."""

    def __init__(self, handlers: Handlers) -> None:
        self.handlers = handlers
        self.alive = False
        self.stop_calls = 0
        self.ready = threading.Event()
        self.ready.set()

    def start(self) -> None:
        self.alive = True

    def wait(self) -> None:
        self.ready.wait()

    def stop(self) -> None:
        self.stop_calls += 1
        self.alive = False

    def is_alive(self) -> bool:
        return self.alive

    def join(self, timeout: float | None = None) -> None:
        pass


class FakeBackend:
    """A ListenerFactory that records the listeners it built."""

    def __init__(self) -> None:
        self.built: list[FakeListener] = []

    def __call__(self, handlers: Handlers) -> Sequence[BackendListener]:
        listener = FakeListener(handlers)
        self.built.append(listener)
        return [listener]

    @property
    def handlers(self) -> Handlers:
        return self.built[-1].handlers


def make_listener(clock: FakeClock, backend: FakeBackend, **kwargs: float) -> PynputInputListener:
    return PynputInputListener(backend, monotonic=clock, wall_clock=lambda: WALL, **kwargs)


class Calls:
    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> None:
        self.count += 1


class SecretKey:
    """A stand-in for a pynput Key/KeyCode: must never be reachable from the listener."""


class SecretButton:
    """A stand-in for a pynput Button."""


def reachable(root: object, max_depth: int = 6) -> list[object]:
    """Every object reachable from `root` through attributes, slots, containers,
    bound methods and closures (what a listener could have stored)."""
    seen: set[int] = set()
    found: list[object] = []
    stack: list[tuple[object, int]] = [(root, 0)]
    while stack:
        obj, depth = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        found.append(obj)
        if depth >= max_depth or isinstance(obj, type | types.ModuleType):
            continue
        children: list[object] = []
        if isinstance(obj, list | tuple | set | frozenset):
            children.extend(obj)
        elif isinstance(obj, dict):
            children.extend(obj.keys())
            children.extend(obj.values())
        elif isinstance(obj, types.MethodType):
            children.append(obj.__self__)
        elif isinstance(obj, types.FunctionType):
            children.extend(cell.cell_contents for cell in obj.__closure__ or ())
        else:
            children.extend(getattr(obj, "__dict__", {}).values())
            for cls in type(obj).__mro__:
                for slot in getattr(cls, "__slots__", ()):
                    children.append(getattr(obj, slot, None))
        stack.extend((child, depth + 1) for child in children)
    return found


def test_key_press_counts_and_notifies_release_only_counts() -> None:
    clock, backend, calls = FakeClock(), FakeBackend(), Calls()
    listener = make_listener(clock, backend)
    listener.start(calls)

    backend.handlers.on_press(SecretKey(), False)
    clock.now += 0.001
    backend.handlers.on_release(SecretKey(), False)

    assert calls.count == 1
    assert listener.event_count() == 2
    assert listener.last_input() == WALL  # the newest event is "now" on the fake clock


def test_every_click_notifies_immediately() -> None:
    clock, backend, calls = FakeClock(), FakeBackend(), Calls()
    listener = make_listener(clock, backend)
    listener.start(calls)

    for pressed in (True, False, True, False):
        backend.handlers.on_click(1.0, 2.0, SecretButton(), pressed, False)
        clock.now += 0.001

    assert calls.count == 4
    assert listener.event_count() == 4


def test_moves_and_scrolls_are_coalesced_but_all_counted() -> None:
    clock, backend, calls = FakeClock(), FakeBackend(), Calls()
    listener = make_listener(clock, backend, move_interval_s=0.05)
    listener.start(calls)
    handlers = backend.handlers

    handlers.on_move(1, 1, False)  # t=0: first move notifies at once
    assert calls.count == 1
    clock.now += 0.01
    handlers.on_move(2, 2, False)
    clock.now += 0.039
    handlers.on_scroll(2, 2, 0, 1, False)  # t=0.049: still inside the window
    assert calls.count == 1
    clock.now += 0.001
    handlers.on_move(3, 3, False)  # t=0.050: window over
    assert calls.count == 2
    clock.now += 0.01
    handlers.on_press(SecretKey(), False)  # keys are never coalesced
    assert calls.count == 3
    clock.now += 0.01
    handlers.on_move(4, 4, False)  # inside the window opened by the key press
    assert calls.count == 3
    assert listener.event_count() == 6


def test_last_input_is_derived_from_the_monotonic_clock() -> None:
    clock, backend = FakeClock(), FakeBackend()
    listener = make_listener(clock, backend)
    assert listener.last_input() is None
    listener.start(Calls())

    backend.handlers.on_press(SecretKey(), False)
    clock.now += 7.5

    assert listener.last_input() == WALL - timedelta(seconds=7.5)


def test_no_key_button_or_position_is_stored() -> None:
    clock, backend = FakeClock(), FakeBackend()
    listener = make_listener(clock, backend)
    listener.start(Calls())
    key, button = SecretKey(), SecretButton()
    positions = {4242.25, 4343.75, 17.125, -3.5}

    backend.handlers.on_press(key, False)
    backend.handlers.on_release(key, False)
    backend.handlers.on_move(4242.25, 4343.75, False)
    backend.handlers.on_click(4242.25, 4343.75, button, True, False)
    backend.handlers.on_scroll(4242.25, 4343.75, 17.125, -3.5, False)

    objects = reachable(listener)
    assert not [o for o in objects if isinstance(o, SecretKey | SecretButton)]
    assert not [o for o in objects if isinstance(o, float) and o in positions]
    # What the listener does keep: a time and counters, nothing else that varies.
    state = {name: value for name, value in vars(listener).items() if not callable(value)}
    assert state["_events"] == 5
    assert state["_last_event"] == clock.now


def test_callback_exception_is_logged_and_listening_continues(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock, backend = FakeClock(), FakeBackend()
    listener = make_listener(clock, backend)

    def failing() -> None:
        raise ValueError("boom")

    listener.start(failing)
    backend.handlers.on_press(SecretKey(), False)  # must not raise into pynput
    backend.handlers.on_press(SecretKey(), False)

    assert listener.event_count() == 2
    assert "on_input callback failed" in caplog.text


def test_stop_stops_callbacks_and_is_idempotent() -> None:
    clock, backend, calls = FakeClock(), FakeBackend(), Calls()
    listener = make_listener(clock, backend)
    listener.start(calls)
    fake = backend.built[-1]

    listener.stop()
    listener.stop()
    fake.handlers.on_press(SecretKey(), False)  # a late event from a dying thread

    assert fake.stop_calls == 1
    assert calls.count == 0


def test_stop_does_not_stop_a_dead_backend_listener() -> None:
    # pynput's stop() blocks forever on a listener whose thread died before it was ready.
    clock, backend = FakeClock(), FakeBackend()
    listener = make_listener(clock, backend)
    listener.start(Calls())
    backend.built[-1].alive = False

    listener.stop()

    assert backend.built[-1].stop_calls == 0


def test_restart_builds_fresh_backend_listeners() -> None:
    clock, backend, calls = FakeClock(), FakeBackend(), Calls()
    listener = make_listener(clock, backend)
    listener.start(calls)
    with pytest.raises(RuntimeError):
        listener.start(calls)
    listener.stop()
    listener.start(calls)

    backend.handlers.on_press(SecretKey(), False)

    assert len(backend.built) == 2
    assert calls.count == 1


def test_backend_failure_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    def broken(_handlers: Handlers) -> Sequence[BackendListener]:
        raise OSError("no X server")

    listener = PynputInputListener(broken)
    listener.start(Calls())

    assert listener.event_count() == 0
    assert listener.last_input() is None
    assert "failed to start" in caplog.text
    listener.stop()


def test_start_waits_for_readiness_only_up_to_the_timeout(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock, backend = FakeClock(), FakeBackend()

    def never_ready(handlers: Handlers) -> Sequence[BackendListener]:
        built = backend(handlers)
        backend.built[-1].ready.clear()
        return built

    listener = PynputInputListener(never_ready, monotonic=clock, ready_timeout_s=0.05)
    listener.start(Calls())  # returns after the timeout instead of hanging

    assert "not ready" in caplog.text
    backend.built[-1].ready.set()  # release the helper thread
    listener.stop()


def test_handlers_accept_any_pynput_signature() -> None:
    # pynput passes (key, injected), (x, y, injected), (x, y, button, pressed, injected),
    # (x, y, dx, dy, injected) in 1.8 and one argument fewer before; both must work.
    clock, backend = FakeClock(), FakeBackend()
    listener = make_listener(clock, backend)
    listener.start(Calls())
    handlers: list[Callable[..., None]] = [
        backend.handlers.on_press,
        backend.handlers.on_release,
        backend.handlers.on_move,
        backend.handlers.on_click,
        backend.handlers.on_scroll,
    ]
    for handler in handlers:
        handler()
        handler(1, 2, 3, 4, 5)

    assert listener.event_count() == 10


def test_listeners_started_before_a_failure_are_stopped() -> None:
    started: list[FakeListener] = []

    class Broken(FakeListener):
        def start(self) -> None:
            raise OSError("mouse hook refused")

    def half_working(handlers: Handlers) -> Sequence[BackendListener]:
        keyboard = FakeListener(handlers)
        started.append(keyboard)
        return [keyboard, Broken(handlers)]

    listener = PynputInputListener(half_working)
    listener.start(Calls())

    assert started[0].stop_calls == 1
    assert not started[0].alive
