"""State → icon, tooltip, header and menu entries from status snapshots (pure)."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone

import pytest

from donor_app.domain.decision import Cause, Decision, EffectiveCaps, Level
from donor_app.domain.status import AgentStatus, GuestSnapshot, LinkStatus
from donor_app.gui import presenter
from donor_app.gui.presenter import Action, TrayState

NOW = datetime(2025, 1, 6, 10, 0, tzinfo=timezone(timedelta(hours=1)))  # a Monday


def status(
    level: Level = Level.RUN,
    cause: Cause = Cause.IDLE,
    cpu: float = 100.0,
    reason: str = "Donating up to 100 % CPU — this computer is idle",
    **fields: object,
) -> AgentStatus:
    decision = Decision(level, cause, EffectiveCaps(cpu, 8192), reason)
    guests = (GuestSnapshot("demo", "running", 97.6, 256.0, 100.0),)
    base = AgentStatus(at=NOW, decision=decision, guests=guests)
    return replace(base, **fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("snapshot", "state"),
    [
        (None, TrayState.DISCONNECTED),
        (status(), TrayState.DONATING),
        (status(Level.THROTTLED, Cause.OWNER_ACTIVE, 25), TrayState.LIMITED),
        (status(Level.RUN, Cause.IDLE, 50), TrayState.LIMITED),
        (status(Level.PAUSED, Cause.OWNER_ACTIVE, 0), TrayState.PAUSED),
        (status(Level.PAUSED, Cause.BATTERY, 0), TrayState.PAUSED),
        (status(Level.PAUSED, Cause.HEAT, 0), TrayState.PAUSED),
        (status(Level.PAUSED, Cause.SCHEDULE, 0), TrayState.PAUSED),
        (status(Level.EVACUATE, Cause.OWNER_ACTIVE, 0), TrayState.PAUSED),
        (status(Level.CHECKPOINT, Cause.OWNER_ACTIVE, 0), TrayState.PAUSED),
        (status(Level.PAUSED, Cause.SNOOZED, 0), TrayState.SNOOZED),
        (status(settings_error="settings.toml: idle_after: must be ≥ 0"), TrayState.ERROR),
    ],
)
def test_state_to_icon(snapshot: AgentStatus | None, state: TrayState) -> None:
    assert presenter.tray_state(snapshot) is state


def test_a_failed_agent_is_an_error_not_a_wait() -> None:
    assert presenter.tray_state(None, failure="the agent exited") is TrayState.ERROR


def with_link(link: LinkStatus | None) -> AgentStatus:
    return replace(status(), coordinator=link or LinkStatus())


def test_a_refused_donor_is_an_error_and_says_why() -> None:
    snapshot = with_link(LinkStatus("coord.example:7443", "refused", "donor revoked"))
    assert presenter.tray_state(snapshot) is TrayState.ERROR
    assert "Coordinator coord.example:7443: refused — donor revoked" in presenter.header_lines(
        snapshot, NOW
    )


def test_coordinator_line_reads_the_link_or_says_none_is_configured() -> None:
    assert presenter.about_lines(status(), "/s", None)[-1] == (
        "No coordinator configured (donating locally only)"
    )
    assert presenter.about_lines(with_link(None), "/s", None)[-1] == (
        "No coordinator configured (donating locally only)"
    )
    linked = with_link(LinkStatus("coord:7443", "connected", donor_id="d-17"))
    assert presenter.about_lines(linked, "/s", None)[-1] == (
        "Coordinator coord:7443: connected as d-17"
    )


def test_tooltip_says_what_is_lent_why_and_when_it_changes() -> None:
    snapshot = status(
        Level.THROTTLED,
        Cause.OWNER_ACTIVE,
        25,
        reason="Limited to 25 % CPU — office hours until 17:00",
    )
    snapshot = replace(
        snapshot, decision=replace(snapshot.decision, next_change=NOW.replace(hour=17))
    )
    assert presenter.tooltip(snapshot, NOW).splitlines() == [
        "donor_app",
        "Limited to 25 % CPU — office hours until 17:00",
        "Lent now: 1 guest, 98 % of a core, 256 MiB",
        "Changes at 17:00",
    ]


def test_a_change_due_within_a_minute_is_not_shown() -> None:
    snapshot = status()
    soon = replace(snapshot.decision, next_change=NOW + timedelta(seconds=20))
    assert not presenter.next_change_line(replace(snapshot, decision=soon), NOW)


def test_lent_line_counts_running_guests_only() -> None:
    guests = (
        GuestSnapshot("a", "running", 50, 1024, 100),
        GuestSnapshot("b", "running", 25, 1024, 100),
        GuestSnapshot("c", "paused", 0, 512, 0),
    )
    assert presenter.lent_line(replace(status(), guests=guests)) == (
        "Lent now: 2 guests, 75 % of a core, 2.0 GiB"
    )
    paused = (GuestSnapshot("c", "paused", 0, 512, 0),)
    assert (
        presenter.lent_line(replace(status(), guests=paused)) == "Nothing lent now (1 guest paused)"
    )
    assert presenter.lent_line(replace(status(), guests=())) == "No guests on this computer"


def test_tooltip_when_disconnected_carries_the_reason() -> None:
    lines = presenter.tooltip(None, NOW, "Retrying… (agent: connection refused)").splitlines()
    assert lines == [
        "donor_app",
        "Not connected to the donor agent",
        "Retrying… (agent: connection refused)",
    ]


def test_menu_while_donating() -> None:
    entries = presenter.menu_entries(status(), NOW)
    actions = {e.action: e.enabled for e in entries if e.action is not None}
    assert actions == {
        Action.PAUSE_1H: True,
        Action.PAUSE_4H: True,
        Action.PAUSE_TOMORROW: True,
        Action.PAUSE_INDEFINITELY: True,
        Action.RESUME: False,
        Action.SETTINGS: True,
        Action.ACTIVITY: True,
        Action.ABOUT: True,
        Action.QUIT: True,
    }
    assert entries[0].text == "Donating up to 100 % CPU — this computer is idle"
    assert not entries[0].enabled and entries[0].action is None


def test_menu_while_snoozed_offers_resume() -> None:
    snoozed = status(Level.PAUSED, Cause.SNOOZED, 0, reason="Snoozed until 11:00")
    entries = presenter.menu_entries(snoozed, NOW)
    resume = next(e for e in entries if e.action is Action.RESUME)
    assert resume.enabled


def test_menu_while_disconnected_offers_only_about_and_quit() -> None:
    entries = presenter.menu_entries(None, NOW)
    enabled = {e.action for e in entries if e.action is not None and e.enabled}
    assert enabled == {Action.ABOUT, Action.QUIT}
    assert entries[0].text == "Not connected to the donor agent"


def test_menu_labels_have_the_e2e_mnemonics() -> None:
    entries = presenter.menu_entries(status(), NOW)
    texts = {e.action: e.text for e in entries if e.action is not None}
    assert texts[Action.PAUSE_1H] == "Pause for &1 hour"
    assert texts[Action.PAUSE_TOMORROW] == "Pause until &tomorrow 08:00"
    mnemonics = [t.split("&")[1][0].lower() for t in texts.values()]
    assert len(mnemonics) == len(set(mnemonics)), "two entries share a mnemonic"


def test_snooze_ends() -> None:
    assert presenter.snooze_until(Action.PAUSE_1H, NOW) == NOW + timedelta(hours=1)
    assert presenter.snooze_until(Action.PAUSE_4H, NOW) == NOW + timedelta(hours=4)
    assert presenter.snooze_until(Action.PAUSE_INDEFINITELY, NOW) is None
    tomorrow = presenter.snooze_until(Action.PAUSE_TOMORROW, NOW)
    assert tomorrow is not None
    local = tomorrow.astimezone()
    assert (local.date(), local.hour, local.minute) == (
        (NOW.astimezone() + timedelta(days=1)).date(),
        8,
        0,
    )
    with pytest.raises(ValueError, match="not a pause"):
        presenter.snooze_until(Action.QUIT, NOW)


def test_when_wording() -> None:
    zone = NOW.tzinfo
    assert presenter.when(NOW.replace(hour=17), NOW) == "at 17:00"
    assert presenter.when(NOW + timedelta(days=1), NOW) == "tomorrow at 10:00"
    assert presenter.when(NOW + timedelta(days=3), NOW) == "on Thu 10:00"
    assert presenter.when(NOW + timedelta(days=30), NOW) == "on 2025-02-05 10:00"
    assert presenter.when(datetime(2025, 1, 6, 16, 0, tzinfo=UTC), NOW) == "at 17:00"
    assert zone is not None


def test_about_says_when_the_tray_started_the_agent() -> None:
    lines = presenter.about_lines(status(user_agent=True), "/run/a.sock", 4242)
    assert lines[0] == "Agent socket: /run/a.sock"
    assert "donor-app started a user-level agent (pid 4242)" in lines[1]
    assert presenter.about_lines(status(), "/s", None)[1] == (
        "Connected to the system's donor agent."
    )
