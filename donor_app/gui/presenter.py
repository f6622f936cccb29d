"""What the tray shows for an agent status: icon, tooltip, menu header and entries.

Pure (no Qt, no I/O): every function takes the status snapshot (None when no agent
answers) and, where wording depends on it, the local time `now`. The Qt layer only
copies these values into widgets, so everything the owner reads is unit-tested here.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, time, timedelta
from enum import Enum

from donor_app.domain.decision import Cause, Level
from donor_app.domain.guest import GuestState
from donor_app.domain.status import AgentStatus, LinkState
from donor_app.gui.coordinator_view import CoordinatorView, coordinator_of
from donor_app.gui.moves_view import moves_lines, origin_lines


class TrayState(Enum):
    """The icon's states; the value is the icon's file stem in `gui/resources/`."""

    DONATING = "donating"
    LIMITED = "limited"
    PAUSED = "paused"
    SNOOZED = "snoozed"
    DISCONNECTED = "disconnected"
    ERROR = "error"


class Action(Enum):
    """What a menu entry does."""

    PAUSE_1H = "pause_1h"
    PAUSE_4H = "pause_4h"
    PAUSE_TOMORROW = "pause_tomorrow"
    PAUSE_INDEFINITELY = "pause_indefinitely"
    RESUME = "resume"
    SETTINGS = "settings"
    ACTIVITY = "activity"
    ABOUT = "about"
    QUIT = "quit"


@dataclass(frozen=True, slots=True)
class MenuEntry:
    """One menu row: a header line (`action` None), a separator (`text` empty and
    `action` None) or an action. `text` carries Qt's `&` mnemonic markers."""

    text: str
    action: Action | None = None
    enabled: bool = True

    @property
    def is_separator(self) -> bool:
        return not self.text and self.action is None


SEPARATOR = MenuEntry("")

# "Until tomorrow" means tomorrow morning, when the owner is back at the desk.
TOMORROW_AT = time(8, 0)

_PAUSED_LEVELS = (Level.PAUSED, Level.EVACUATE, Level.CHECKPOINT)


def tray_state(status: AgentStatus | None, failure: str = "") -> TrayState:
    """The icon for `status` (None: no agent answers; `failure` set: and it will not
    come back by itself, e.g. the agent this tray started has exited).

    Limited: donating, but at less than the whole CPU (the owner is active with a
    non-zero in-use cap, or a schedule window / fleet bound caps the CPU). An invalid
    settings file or a coordinator that refuses this donor is an error the owner must
    fix, so it wins over the donation state.
    """
    if status is None:
        return TrayState.ERROR if failure else TrayState.DISCONNECTED
    coordinator = coordinator_of(status)
    if status.settings_error or (
        coordinator is not None and coordinator.state == LinkState.REFUSED
    ):
        return TrayState.ERROR
    decision = status.decision
    if decision.cause is Cause.SNOOZED or status.snoozed_indefinitely:
        return TrayState.SNOOZED
    if decision.level in _PAUSED_LEVELS:
        return TrayState.PAUSED
    if decision.level is Level.THROTTLED or decision.caps.cpu_percent < 100:
        return TrayState.LIMITED
    return TrayState.DONATING


def is_snoozed(status: AgentStatus | None) -> bool:
    return status is not None and (
        status.decision.cause is Cause.SNOOZED or status.snoozed_indefinitely
    )


def lent_line(status: AgentStatus) -> str:
    """What the guests use right now, e.g. "Lent now: 1 guest, 98 % of a core, 256 MiB"."""
    running = [g for g in status.guests if g.state == GuestState.RUNNING]
    if not status.guests:
        return "No guests on this computer"
    if not running:
        count = _plural(len(status.guests), "guest")
        return f"Nothing lent now ({count} paused)"
    cpu = sum(g.cpu_percent for g in running)
    memory = sum(g.memory_mib for g in running)
    return f"Lent now: {_plural(len(running), 'guest')}, {cpu:.0f} % of a core, {_mib(memory)}"


# Changes due sooner are the agent re-checking (e.g. idleness): noise in a menu.
NEXT_CHANGE_SHOWN_AFTER = timedelta(minutes=1)


def next_change_line(status: AgentStatus, now: datetime) -> str:
    """When the decision changes by itself ("Changes at 17:00"), or ""."""
    moment = status.decision.next_change
    if moment is None or status.snoozed_indefinitely or moment - now < NEXT_CHANGE_SHOWN_AFTER:
        return ""
    return f"Changes {when(moment, now)}"


def header_lines(status: AgentStatus | None, now: datetime) -> list[str]:
    """The menu's first lines: what is lent and why, and problems the owner must see."""
    if status is None:
        return ["Not connected to the donor agent", "Retrying…"]
    lines = [status.decision.reason, lent_line(status), *origin_lines(status)]
    change = next_change_line(status, now)
    if change:
        lines.append(change)
    if status.settings_error:
        lines.append(f"Settings file error (last good settings apply): {status.settings_error}")
    coordinator = coordinator_of(status)
    if coordinator is not None and coordinator.state in (LinkState.DISCONNECTED, LinkState.REFUSED):
        lines.append(coordinator_line(coordinator))
    return lines


def tooltip(status: AgentStatus | None, now: datetime, disconnected_detail: str = "") -> str:
    """The tray icon's tooltip: the header lines, titled."""
    lines = ["donor_app", *header_lines(status, now)]
    if status is None and disconnected_detail:
        lines[-1] = disconnected_detail
    return "\n".join(lines)


def coordinator_line(coordinator: CoordinatorView | None) -> str:
    """The fleet link in one line, for the menu, the settings dialog and About."""
    if coordinator is None:
        return "No coordinator configured (donating locally only)"
    text = f"Coordinator {coordinator.address}: {coordinator.state.replace('_', ' ')}"
    if coordinator.donor_id:
        text += f" as {coordinator.donor_id}"
    if coordinator.detail:
        text += f" — {coordinator.detail}"
    return text


def menu_entries(status: AgentStatus | None, now: datetime) -> list[MenuEntry]:
    """The tray menu for `status`, rebuilt each time it opens."""
    connected = status is not None
    snoozed = is_snoozed(status)
    tomorrow = snooze_until(Action.PAUSE_TOMORROW, now)
    assert tomorrow is not None
    moves = moves_lines(status, now) if status is not None else []
    return [
        *(MenuEntry(line, enabled=False) for line in header_lines(status, now)),
        *([SEPARATOR] if moves else []),
        *(MenuEntry(line, enabled=False) for line in moves),
        SEPARATOR,
        MenuEntry("Pause for &1 hour", Action.PAUSE_1H, connected),
        MenuEntry("Pause for &4 hours", Action.PAUSE_4H, connected),
        MenuEntry(f"Pause until &tomorrow {tomorrow:%H:%M}", Action.PAUSE_TOMORROW, connected),
        MenuEntry("Pause until I &resume", Action.PAUSE_INDEFINITELY, connected),
        MenuEntry("Res&ume donating", Action.RESUME, connected and snoozed),
        SEPARATOR,
        MenuEntry("&Settings…", Action.SETTINGS, connected),
        MenuEntry("&Activity…", Action.ACTIVITY, connected),
        MenuEntry("A&bout", Action.ABOUT),
        MenuEntry("&Quit", Action.QUIT),
    ]


def snooze_until(action: Action, now: datetime) -> datetime | None:
    """The end of the snooze `action` asks for (None: until resumed).

    `now` is timezone-aware local time; "tomorrow" is tomorrow at `TOMORROW_AT` on the
    local wall clock (computed on the naive wall clock so a DST change keeps 08:00).
    Raises ValueError for an action that is not a pause.
    """
    if action is Action.PAUSE_1H:
        return now + timedelta(hours=1)
    if action is Action.PAUSE_4H:
        return now + timedelta(hours=4)
    if action is Action.PAUSE_TOMORROW:
        day = now.date() + timedelta(days=1)
        return datetime.combine(day, TOMORROW_AT).astimezone()
    if action is Action.PAUSE_INDEFINITELY:
        return None
    raise ValueError(f"action: {action.value} is not a pause")


def action_label(action: Action, now: datetime) -> str:
    """The menu text of `action` without its mnemonic ("Pause for 4 hours")."""
    entry = next(e for e in menu_entries(None, now) if e.action is action)
    return entry.text.replace("&", "")


PAUSE_ACTIONS = frozenset(
    {Action.PAUSE_1H, Action.PAUSE_4H, Action.PAUSE_TOMORROW, Action.PAUSE_INDEFINITELY}
)


def when(moment: datetime, now: datetime) -> str:
    """ "at 17:00" today, "tomorrow at 08:00", "on Mon 09:00", or the date further out."""
    local, today = moment.astimezone(now.tzinfo), now.date()
    if local.date() == today:
        return f"at {local:%H:%M}"
    if local.date() == today + timedelta(days=1):
        return f"tomorrow at {local:%H:%M}"
    if local.date() < today + timedelta(days=7):
        return f"on {local:%a %H:%M}"
    return f"on {local:%Y-%m-%d %H:%M}"


def about_lines(
    status: AgentStatus | None, socket: str, started_agent_pid: int | None
) -> list[str]:
    """The About box: which agent this tray talks to and who started it."""
    lines = [f"Agent socket: {socket}"]
    if started_agent_pid is not None:
        lines.append(
            "No agent was running, so donor-app started a user-level agent "
            f"(pid {started_agent_pid}); it keeps running when the tray quits."
        )
    elif status is not None and status.user_agent:
        lines.append("Connected to a user-level agent.")
    elif status is not None:
        lines.append("Connected to the system's donor agent.")
    else:
        lines.append("Not connected to an agent.")
    if status is not None:
        lines.append(coordinator_line(coordinator_of(status)))
    return lines


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _mib(mib: float) -> str:
    return f"{mib / 1024:.1f} GiB" if mib >= 1024 else f"{mib:.0f} MiB"
