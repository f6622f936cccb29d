"""The settings dialog against a real agent: fields, validation, locks, refusals, Cancel."""

from __future__ import annotations

from datetime import time, timedelta
from pathlib import Path

from PySide6.QtCore import QPoint, Qt
from PySide6.QtWidgets import QDialog
from pytestqt.qtbot import QtBot

from donor_app.agent.local_client import AgentClient
from donor_app.domain.settings import Settings, Weekday
from donor_app.gui.settings_dialog import SettingsDialog
from donor_app.settings.autostart import Autostart, xdg_desktop_entry
from tests.agent_in_process import InProcessAgent
from tests.gui.conftest import MakeAgent
from tests.waiting import wait_for

SETTINGS = """\
idle_after = 240
evacuate_after = 300
[caps.in_use]
cpu_percent = 10
memory_mib = 2048
[caps.idle]
cpu_percent = 80
memory_percent = 40
[[schedule]]
label = "office hours"
days = ["mon", "tue", "wed", "thu", "fri"]
start = "09:00"
end = "17:00"
[schedule.caps.in_use]
cpu_percent = 25
[[schedule]]
label = "nights"
days = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
start = "18:00"
end = "08:00"
"""


def send(agent: InProcessAgent, settings: Settings) -> None:
    """As the tray saves: a fresh connection per call (a channel that failed backs off
    on its own, for up to minutes)."""
    with AgentClient(agent.socket) as client:
        client.update_settings(settings)


def open_dialog(
    qtbot: QtBot, agent: InProcessAgent, autostart: Autostart | None = None
) -> SettingsDialog:
    settings, locked = agent.client.settings()
    dialog = SettingsDialog(
        settings,
        locked,
        agent.client.status(),
        lambda settings: send(agent, settings),
        autostart=autostart,
        autostart_command=["/opt/donor-app"],
    )
    qtbot.addWidget(dialog)
    dialog.show()
    return dialog


def test_the_dialog_shows_the_agents_settings(qtbot: QtBot, make_agent: MakeAgent) -> None:
    agent = make_agent(SETTINGS)
    dialog = open_dialog(qtbot, agent)
    assert dialog.enabled.isChecked()
    assert dialog.idle_after.value() == 240
    assert dialog.caps.cpu["in_use"].value() == 10
    assert dialog.caps.memory_mib["in_use"].value() == 2048
    assert dialog.caps.memory_percent["in_use"].text() == "—"  # not set
    assert dialog.caps.cpu["idle"].value() == 80
    assert dialog.caps.memory_percent["idle"].value() == 40
    assert dialog.schedule.list.count() == 2
    assert (
        dialog.schedule.list.item(0).text() == "office hours: Mon, Tue, Wed, Thu, Fri 09:00–17:00"
    )
    # The first window is selected, with its own limits.
    assert dialog.schedule.label.text() == "office hours"
    assert dialog.schedule.own_caps.isChecked()
    assert dialog.schedule.caps.cpu["in_use"].value() == 25
    dialog.schedule.select(1)
    assert dialog.schedule.label.text() == "nights"
    assert not dialog.schedule.own_caps.isChecked()
    assert dialog.coordinator_state.text() == "No coordinator configured (donating locally only)"


def test_save_sends_the_edits_and_keeps_what_the_dialog_does_not_show(
    qtbot: QtBot, make_agent: MakeAgent
) -> None:
    agent = make_agent(SETTINGS)
    dialog = open_dialog(qtbot, agent)
    dialog.caps.cpu["idle"].setValue(40)
    dialog.pause_on_battery.setChecked(False)
    dialog.schedule.select(1)
    dialog.schedule.start.setTime(dialog.schedule.start.time().addSecs(3600))  # 19:00
    dialog.buttons.button(dialog.buttons.StandardButton.Save).click()
    assert dialog.result() == QDialog.DialogCode.Accepted
    saved, _ = agent.client.settings()
    assert saved.caps.idle.cpu_percent == 40
    assert not saved.pause_on_battery
    assert saved.schedule[1].window.start == time(19)
    assert saved.schedule[0].caps is not None and saved.schedule[0].caps.in_use.cpu_percent == 25
    assert saved.evacuate_after == timedelta(seconds=300)  # not in the dialog, kept


def test_validation_names_the_field_and_sends_nothing(qtbot: QtBot, make_agent: MakeAgent) -> None:
    agent = make_agent(SETTINGS)
    before = agent.settings_file.read_text()
    dialog = open_dialog(qtbot, agent)
    dialog.caps.memory_percent["idle"].setValue(-1)  # "—": neither memory cap left
    dialog.buttons.button(dialog.buttons.StandardButton.Save).click()
    assert dialog.isVisible()
    assert dialog.error.isVisible()
    assert dialog.error.text() == (
        "Limits › while the computer is idle (caps.idle): "
        "needs memory_mib or memory_percent (or both)"
    )
    assert agent.settings_file.read_text() == before
    assert agent.client.settings()[0].caps.idle.memory_percent == 40


def test_an_overlapping_window_is_named_and_selected(qtbot: QtBot, make_agent: MakeAgent) -> None:
    agent = make_agent(SETTINGS)
    dialog = open_dialog(qtbot, agent)
    dialog.schedule.select(1)
    dialog.schedule.start.setTime(dialog.schedule.start.time().addSecs(-4 * 3600))  # 14:00
    dialog.schedule.select(0)
    dialog.buttons.button(dialog.buttons.StandardButton.Save).click()
    assert dialog.isVisible()
    assert dialog.error.text().startswith("Schedule window 2 (schedule[1]): overlaps schedule[0]")
    assert dialog.tabs.currentWidget() is dialog.schedule
    assert dialog.schedule.selected == 1
    assert agent.client.settings()[0].schedule[1].window.start == time(18)


def test_locked_fields_are_disabled_with_the_admins_reason(
    qtbot: QtBot, make_agent: MakeAgent
) -> None:
    fleet = (
        'reason = "IT policy, ask it@example.org"\n'
        "max_cpu_percent = 50\n"
        "owner_may_disable = false\n"
    )
    agent = make_agent(SETTINGS, fleet)
    dialog = open_dialog(qtbot, agent)
    fields = dialog.fields()
    for key in ("enabled", "caps.in_use.cpu_percent", "caps.idle.cpu_percent"):
        assert not fields[key].isEnabled(), key
        assert "IT policy, ask it@example.org" in fields[key].toolTip()
    assert fields["caps.idle.memory_percent"].isEnabled()
    assert fields["idle_after"].isEnabled()
    assert dialog.locks_note.isVisibleTo(dialog)
    assert "at most 50 % CPU — IT policy" in dialog.locks_note.text()
    # A window's own limits are bounded the same way.
    assert dialog.schedule.own_caps.isChecked()
    assert not dialog.schedule.caps.cpu["idle"].isEnabled()
    assert dialog.schedule.caps.memory_percent["idle"].isEnabled()


def test_a_refusal_by_the_agent_is_shown_and_the_edits_are_kept(
    qtbot: QtBot, make_agent: MakeAgent
) -> None:
    agent = make_agent(SETTINGS)
    dialog = open_dialog(qtbot, agent)
    dialog.caps.cpu["idle"].setValue(33)
    # Valid for the domain, but over the agent's 64 KiB limit for a settings message.
    huge = "€" * 30_000
    dialog.schedule.label.setText(huge)
    dialog.schedule.label.textEdited.emit(huge)
    dialog.buttons.button(dialog.buttons.StandardButton.Save).click()
    assert dialog.isVisible()
    assert dialog.error.text().startswith("The agent refused the settings — settings (toml): ")
    assert "at most 65536" in dialog.error.text()
    assert dialog.caps.cpu["idle"].value() == 33
    assert dialog.schedule.label.text() == huge
    assert agent.client.settings()[0].caps.idle.cpu_percent == 80


def test_an_unreachable_agent_is_shown_and_the_edits_are_kept(
    qtbot: QtBot, make_agent: MakeAgent
) -> None:
    agent = make_agent(SETTINGS)
    dialog = open_dialog(qtbot, agent)
    dialog.idle_after.setValue(99)
    agent.stop_api()
    dialog.buttons.button(dialog.buttons.StandardButton.Save).click()
    assert dialog.isVisible()
    assert dialog.error.text().startswith("The agent is not answering; nothing was saved")
    assert dialog.idle_after.value() == 99
    agent.start_api()
    dialog.buttons.button(dialog.buttons.StandardButton.Save).click()
    assert not dialog.isVisible()
    assert agent.client.settings()[0].idle_after == timedelta(seconds=99)


def test_cancel_changes_nothing(qtbot: QtBot, make_agent: MakeAgent, tmp_path: Path) -> None:
    agent = make_agent(SETTINGS)
    before = agent.settings_file.read_text()
    autostart = Autostart(platform="linux", environ={}, home=tmp_path)
    dialog = open_dialog(qtbot, agent, autostart)
    dialog.caps.cpu["idle"].setValue(5)
    dialog.enabled.setChecked(False)
    dialog.start_at_login.setChecked(True)
    dialog.schedule.add_button.click()
    dialog.buttons.button(dialog.buttons.StandardButton.Cancel).click()
    assert dialog.result() == QDialog.DialogCode.Rejected
    assert agent.settings_file.read_text() == before
    assert not autostart.is_enabled()


def test_start_at_login_is_applied_on_save(
    qtbot: QtBot, agent: InProcessAgent, tmp_path: Path
) -> None:
    autostart = Autostart(platform="linux", environ={}, home=tmp_path)
    dialog = open_dialog(qtbot, agent, autostart)
    assert not dialog.start_at_login.isChecked()
    dialog.start_at_login.setChecked(True)
    dialog.buttons.button(dialog.buttons.StandardButton.Save).click()
    file = tmp_path / ".config" / "autostart" / "donor-app.desktop"
    assert file.read_text() == xdg_desktop_entry(["/opt/donor-app"])
    again = open_dialog(qtbot, agent, autostart)
    assert again.start_at_login.isChecked()
    again.start_at_login.setChecked(False)
    again.buttons.button(again.buttons.StandardButton.Save).click()
    assert not file.exists()


def test_dragging_over_the_grid_adds_a_window(qtbot: QtBot, agent: InProcessAgent) -> None:
    dialog = open_dialog(qtbot, agent)
    dialog.tabs.setCurrentWidget(dialog.schedule)
    grid = dialog.schedule.grid
    assert dialog.schedule.empty_note.isVisible()
    start = grid.cell_rect((Weekday.MON, 9)).center()
    end = grid.cell_rect((Weekday.FRI, 16)).center()
    qtbot.mousePress(grid, Qt.MouseButton.LeftButton, pos=start)
    qtbot.mouseMove(grid, pos=QPoint(end.x(), end.y()))
    qtbot.mouseRelease(grid, Qt.MouseButton.LeftButton, pos=end)
    assert dialog.schedule.list.count() == 1
    assert dialog.schedule.list.item(0).text() == "window: Mon, Tue, Wed, Thu, Fri 09:00–17:00"
    dialog.schedule.label.setText("work")
    dialog.schedule.label.textEdited.emit("work")
    dialog.buttons.button(dialog.buttons.StandardButton.Save).click()
    (entry,) = agent.client.settings()[0].schedule
    assert entry.window.label == "work"
    assert (entry.window.start, entry.window.end) == (time(9), time(17))
    assert len(entry.window.days) == 5


def test_a_broken_settings_file_is_shown_and_saving_replaces_it(
    qtbot: QtBot, agent: InProcessAgent
) -> None:
    agent.settings_file.write_text("idle_after = 'soon'\n")
    status = wait_for(
        lambda: (s := agent.client.status()).settings_error and s, 15, "the agent to see the error"
    )
    assert "idle_after" in status.settings_error
    dialog = open_dialog(qtbot, agent)
    banner = dialog.findChild(type(dialog.error), "settings_error")
    assert banner is not None and "idle_after" in banner.text()
    dialog.buttons.button(dialog.buttons.StandardButton.Save).click()
    assert not dialog.isVisible()
    wait_for(lambda: not agent.client.status().settings_error, 15, "the error to clear")
    assert "idle_after = 1" in agent.settings_file.read_text()
