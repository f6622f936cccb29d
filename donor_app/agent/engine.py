"""The agent's engine: sensors and a tick → `decide()` → the guests.

One thread, the engine thread, owns every decision and every hypervisor call, so the
policy's state (`Since`) and the settings store need no locks. Other threads talk to it
in two ways only:

- `notify_input()` / `report_activity()`: record an input and wake the engine at once —
  the critical path for giving the machine back (docs/architecture.md walks through it).
  An input wake re-decides with the readings it already has (no host scan, no file
  reads) and pauses first.
- `call()`: run a function on the engine thread and wait for its result (settings
  updates, snooze), so a client's change is applied between two decisions.

Every `tick_s` (a "full" step) it also polls the idle counter, reads the host, reloads
the settings files, refreshes the guest list, measures the guests, records history and
publishes a status snapshot to the watchers.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Protocol, TypeVar

from donor_app.activity.ports import HostSensor, IdleCounter, InputListener
from donor_app.agent.actuator import Actuator, Guests
from donor_app.domain.decision import Decision, Level
from donor_app.domain.fleet import FleetPolicy
from donor_app.domain.guest import GuestState
from donor_app.domain.policy import Since, decide, track
from donor_app.domain.readings import ActivityReading, HostReading
from donor_app.domain.settings import SNOOZE_FOREVER, SNOOZE_UNTIL_RESUMED, Settings
from donor_app.domain.status import AgentStatus, GuestMove, GuestSnapshot, LinkStatus
from donor_app.hypervisor.errors import HypervisorError

log = logging.getLogger(__name__)
T = TypeVar("T")

# "Pause until I resume": a snooze whose end nobody will live to see.
SETTINGS_RELOAD_S = 5.0
RECONCILE_S = 10.0  # re-apply the decision even unchanged, in case a guest was touched


class SettingsSource(Protocol):
    """`donor_app.settings.config.SettingsStore`; used from the engine thread only."""

    @property
    def settings(self) -> Settings: ...
    @property
    def fleet(self) -> FleetPolicy: ...
    @property
    def errors(self) -> tuple[Exception, ...]: ...
    def reload(self) -> bool: ...
    def save(self, settings: Settings) -> None: ...


class HistorySink(Protocol):
    """`donor_app.agent.history.History`; called from the engine thread."""

    def record(
        self, now: datetime, guest: str, cpu_seconds: float, memory_gib_hours: float
    ) -> None: ...


class _NoIdleCounter:
    def seconds_since_last_input(self) -> float | None:
        return None

    def close(self) -> None:
        return None


class Engine:
    """Runs the policy against the guests on its own thread. See the module docstring."""

    def __init__(
        self,
        guests: Guests,
        store: SettingsSource,
        host_sensor: HostSensor,
        *,
        idle_counter: IdleCounter | None = None,
        input_listener: InputListener | None = None,
        history: HistorySink | None = None,
        clock: Callable[[], datetime] | None = None,
        tick_s: float = 1.0,
        status_every_s: float = 2.0,
        user_agent: bool = False,
    ) -> None:
        self._guests = guests
        self._store = store
        self._host_sensor = host_sensor
        self._idle = idle_counter or _NoIdleCounter()
        self._listener = input_listener
        self._history = history
        self._clock = clock or (lambda: datetime.now().astimezone())
        self._tick_s = tick_s
        self._status_every_s = status_every_s
        self._user_agent = user_agent
        self._actuator = Actuator(guests)

        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()

        self._lock = threading.Lock()  # guards the fields below, shared with other threads
        self._reported_input: datetime | None = None
        self._reported_events = 0
        self._status: AgentStatus | None = None
        self._watchers: list[queue.Queue[AgentStatus]] = []
        self._link = LinkStatus()
        self._moves: tuple[GuestMove, ...] = ()
        # Guests the coordinator link holds back whatever the policy says (their lease
        # lapsed: this donor can no longer prove it owns them).
        self._held: frozenset[str] = frozenset()

        # Engine-thread state.
        self._since = Since()
        self._decision: Decision | None = None
        self._host: HostReading | None = None
        self._names: list[str] = []
        self._idle_input: datetime | None = None
        self._usage: dict[str, tuple[float, float]] = {}  # guest → (cpu s, monotonic)
        self._snapshots: tuple[GuestSnapshot, ...] = ()
        self._last_reload = self._last_apply = self._last_status = -1e9

    # --- other threads ----------------------------------------------------------------

    def start(self) -> None:
        self._store.reload()
        if self._listener is not None:
            self._listener.start(self.notify_input)
        self._thread.start()

    def stop(self, *, pause_guests: bool = True) -> None:
        """Stop the engine; by default the guests are left paused (not lost)."""
        if self._listener is not None:
            self._listener.stop()
        self._stopping.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join()
        if pause_guests:
            self._actuator.pause_all(self._list_guests())
        self._idle.close()

    def notify_input(self) -> None:
        """The input listener saw an event (its own thread; must stay cheap)."""
        self._wake.set()

    def report_activity(self, last_input: datetime, events: int) -> None:
        """Input seen by another process (the tray); wakes the engine at once."""
        with self._lock:
            if self._reported_input is None or last_input > self._reported_input:
                self._reported_input = last_input
            self._reported_events += events
        self._wake.set()

    def call(self, fn: Callable[[], T], timeout: float = 30.0) -> T:
        """Run `fn` on the engine thread and return its result (or raise its error)."""
        return self.submit(fn).result(timeout)

    def submit(self, fn: Callable[[], T]) -> Future[T]:
        """Run `fn` on the engine thread; the future gets its result or error. One
        cancelled before the engine reaches it is skipped. For callers that must not
        block a thread while they wait (the local API's event loop)."""
        future: Future[T] = Future()

        def run() -> None:
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except BaseException as exc:
                    future.set_exception(exc)

        self._commands.put(run)
        self._wake.set()
        return future

    def set_link_status(self, link: LinkStatus) -> None:
        """The coordinator link's state changed (its thread); clients see it at once."""
        with self._lock:
            changed = link != self._link
            self._link = link
        if changed:
            self._commands.put(self._republish)
            self._wake.set()

    def set_moves(self, moves: tuple[GuestMove, ...]) -> None:
        """The latest fleet guest moves, newest first (the move journal's listener: the
        link's thread or this engine's); clients see them at once. Cheap, never blocks."""
        with self._lock:
            changed = moves != self._moves
            self._moves = moves
        if changed:
            self._commands.put(self._republish)
            self._wake.set()

    def hold_paused(self, names: frozenset[str]) -> None:
        """Keep these guests paused whatever the policy says, until called without them."""
        with self._lock:
            changed = names != self._held
            self._held = names
        if changed:
            self._commands.put(lambda: self._decide_and_apply(full=False, force=True))
            self._wake.set()

    def status(self) -> AgentStatus | None:
        with self._lock:
            return self._status

    def watch(self) -> queue.Queue[AgentStatus]:
        """A queue that always holds the newest status (older ones are dropped)."""
        watcher: queue.Queue[AgentStatus] = queue.Queue(maxsize=1)
        with self._lock:
            self._watchers.append(watcher)
            if self._status is not None:
                watcher.put_nowait(self._status)
        return watcher

    def unwatch(self, watcher: queue.Queue[AgentStatus]) -> None:
        with self._lock:
            if watcher in self._watchers:
                self._watchers.remove(watcher)

    # --- commands (run on the engine thread through call()) -----------------------------

    def update_settings(self, settings: Settings) -> Settings:
        self._store.save(settings)
        self._decide_and_apply(full=False, force=True)
        return self._store.settings

    def snooze(self, until: datetime | None) -> AgentStatus:
        """Stop donating until `until` (None: until `resume_donating`)."""
        end = until if until is not None else self._clock() + SNOOZE_FOREVER
        self._store.save(replace(self._store.settings, snooze_until=end))
        self._decide_and_apply(full=False, force=True)
        return self._publish(force=True)

    def resume_donating(self) -> AgentStatus:
        self._store.save(replace(self._store.settings, snooze_until=None))
        self._decide_and_apply(full=False, force=True)
        return self._publish(force=True)

    def current_settings(self) -> Settings:
        return self._store.settings

    def current_fleet(self) -> FleetPolicy:
        return self._store.fleet

    # --- the engine thread --------------------------------------------------------------

    def _run(self) -> None:
        next_full = time.monotonic()
        while not self._stopping.is_set():
            self._wake.wait(max(0.0, next_full - time.monotonic()))
            self._wake.clear()
            if self._stopping.is_set():
                break
            full = time.monotonic() >= next_full
            try:
                self._decide_and_apply(full=full)
                self._run_commands()
                if full:
                    next_full = time.monotonic() + self._tick_s
                    self._measure_and_publish()
            except Exception:  # one bad step must not end the owner's protection
                log.exception("engine step failed; retrying at the next tick")
                next_full = time.monotonic() + self._tick_s
        self._run_commands()

    def _run_commands(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            command()

    def _list_guests(self) -> list[str]:
        try:
            return self._guests.list_guests()
        except HypervisorError as error:
            log.warning("cannot list guests: %s", error)
            return self._names

    def _activity(self, now: datetime, poll_idle: bool) -> ActivityReading:
        if poll_idle:
            idle_s = self._idle.seconds_since_last_input()
            if idle_s is not None:
                self._idle_input = now - timedelta(seconds=idle_s)
        candidates = [self._idle_input]
        events = 0
        if self._listener is not None:
            candidates.append(self._listener.last_input())
            events = self._listener.event_count()
        with self._lock:
            candidates.append(self._reported_input)
            events += self._reported_events
        seen = [c for c in candidates if c is not None]
        return ActivityReading(max(seen) if seen else None, events)

    def _decide_and_apply(self, *, full: bool, force: bool = False) -> None:
        mono = time.monotonic()
        now = self._clock()
        if full:
            if mono - self._last_reload >= SETTINGS_RELOAD_S:
                self._store.reload()
                self._last_reload = mono
            self._host = self._host_sensor.read()
            names = self._list_guests()
            force = force or names != self._names
            self._names = names
        if self._host is None:
            self._host = self._host_sensor.read()
        activity = self._activity(now, poll_idle=full)
        settings, fleet = self._store.settings, self._store.fleet
        self._since = track(self._since, now, settings, activity, self._host)
        decision = decide(now, settings, fleet, activity, self._host, self._since)
        changed = self._decision is None or not decision.same_state(self._decision)
        if changed:
            log.info("%s (%s)", decision.reason, decision.level.value)
        self._decision = decision
        reconcile = full and mono - self._last_apply >= RECONCILE_S
        if changed or force or reconcile:
            with self._lock:
                held = self._held
            free = [name for name in self._names if name not in held]
            self._actuator.apply(decision, free, self._host.cpu_count)
            if held:
                self._actuator.pause_all([name for name in self._names if name in held])
            self._last_apply = mono
            if changed:
                self._publish(force=True)

    def _republish(self) -> None:
        if self._decision is not None:
            self._publish(force=True)

    def _measure_and_publish(self) -> None:
        now = self._clock()
        mono = time.monotonic()
        snapshots = []
        for name in self._names:
            try:
                state = self._guests.state(name)
                usage = self._guests.usage(name)
                cap = self._guests.cpu_cap(name)
            except HypervisorError as error:
                log.debug("cannot measure %s: %s", name, error)
                continue
            cpu_s, at = self._usage.get(name, (usage.cpu_seconds, mono))
            interval = mono - at
            delta = max(0.0, usage.cpu_seconds - cpu_s)
            self._usage[name] = (usage.cpu_seconds, mono)
            cpu_percent = 100 * delta / interval if interval > 0 else 0.0
            running = state is GuestState.RUNNING
            if self._history is not None and interval > 0:
                gib_hours = usage.memory_mib / 1024 * interval / 3600 if running else 0.0
                self._history.record(now, name, delta, gib_hours)
            snapshots.append(
                GuestSnapshot(name, state, round(cpu_percent, 1), usage.memory_mib, cap)
            )
        for gone in set(self._usage) - set(self._names):
            del self._usage[gone]
        self._snapshots = tuple(snapshots)
        self._publish(force=mono - self._last_status >= self._status_every_s)

    def _publish(self, *, force: bool) -> AgentStatus:
        assert self._decision is not None
        settings = self._store.settings
        snooze = settings.snooze_until
        now = self._clock()
        snoozed = snooze is not None and snooze > now
        errors = self._store.errors
        status = AgentStatus(
            at=now,
            decision=self._decision,
            guests=self._snapshots,
            snoozed_until=snooze if snoozed else None,
            snoozed_indefinitely=bool(snooze and snoozed and snooze - now > SNOOZE_UNTIL_RESUMED),
            settings_error="; ".join(str(e) for e in errors),
            user_agent=self._user_agent,
        )
        with self._lock:
            status = replace(status, coordinator=self._link, moves=self._moves)
            previous = self._status
            if not force and status.same_except_time(previous):
                return previous if previous is not None else status
            self._status = status
            watchers = list(self._watchers)
        self._last_status = time.monotonic()
        for watcher in watchers:
            with contextlib.suppress(queue.Empty):
                watcher.get_nowait()
            # Full: another publish won the race; its status is as new as this one.
            with contextlib.suppress(queue.Full):
                watcher.put_nowait(status)
        return status

    @property
    def decision(self) -> Decision | None:
        return self._decision

    @property
    def level(self) -> Level | None:
        return self._decision.level if self._decision else None
