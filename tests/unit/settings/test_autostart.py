"""The autostart file, Run-key value and LaunchAgent plist (pure), and the XDG writer."""

from __future__ import annotations

import plistlib
from pathlib import Path

import pytest

from donor_app.settings.autostart import (
    RUN_KEY,
    Autostart,
    autostart_file,
    launch_agent_plist,
    tray_command,
    windows_run_entry,
    xdg_desktop_entry,
)


def exec_line(entry: str) -> str:
    return next(line for line in entry.splitlines() if line.startswith("Exec="))[5:]


def unescape_exec(value: str) -> list[str]:
    """How a desktop-entry reader turns Exec back into argv (spec: string escapes first,
    then the quoting rule — inside quotes a backslash escapes " ` $ \\ — then %% → %)."""
    text = value.replace("\\\\", "\\")
    words: list[str] = []
    i = 0
    while i < len(text):
        if text[i] == " ":
            i += 1
            continue
        word = ""
        if text[i] == '"':
            i += 1
            while text[i] != '"':
                if text[i] == "\\" and text[i + 1] in '"`$\\':
                    i += 1
                word += text[i]
                i += 1
            i += 1
        else:
            while i < len(text) and text[i] != " ":
                word += text[i]
                i += 1
        words.append(word.replace("%%", "%"))
    return words


def test_xdg_entry_is_a_complete_autostart_file() -> None:
    entry = xdg_desktop_entry(["/opt/donor/bin/donor-app"])
    assert entry == (
        "[Desktop Entry]\n"
        "Type=Application\n"
        "Name=donor_app\n"
        "Comment=Lend this computer's idle CPU and RAM; shows what is lent and why\n"
        "Exec=/opt/donor/bin/donor-app\n"
        "Icon=donor-app\n"
        "Terminal=false\n"
        "Categories=Utility;\n"
        "X-GNOME-Autostart-enabled=true\n"
    )


@pytest.mark.parametrize(
    "command",
    [
        ["/home/ann/my venv/bin/python", "-m", "donor_app.gui"],
        ["/opt/d$x/donor-app", "--socket", '/run/"odd"/a.sock'],
        ["C:\\Python\\python.exe", "100%", ""],
    ],
)
def test_xdg_exec_quotes_and_escapes_so_the_command_reads_back(command: list[str]) -> None:
    value = exec_line(xdg_desktop_entry(command))
    assert unescape_exec(value) == command


def test_xdg_exec_quotes_a_path_with_a_space() -> None:
    value = exec_line(xdg_desktop_entry(["/home/ann/my venv/bin/donor-app"]))
    assert value == '"/home/ann/my venv/bin/donor-app"'


def test_line_breaks_in_a_command_are_refused() -> None:
    with pytest.raises(ValueError, match="line break"):
        xdg_desktop_entry(["/bin/x", "a\nb"])
    with pytest.raises(ValueError, match="empty"):
        xdg_desktop_entry([])


def test_windows_run_value_quotes_the_windows_way() -> None:
    entry = windows_run_entry(["C:\\Program Files\\donor\\donor-app.exe", "--log-level", "INFO"])
    assert entry.key == RUN_KEY == r"Software\Microsoft\Windows\CurrentVersion\Run"
    assert entry.name == "donor_app"
    assert entry.value == '"C:\\Program Files\\donor\\donor-app.exe" --log-level INFO'


def test_launch_agent_plist() -> None:
    data = plistlib.loads(launch_agent_plist(["/Applications/donor/donor-app", "--x"]))
    assert data == {
        "Label": "org.donor_app.tray",
        "ProgramArguments": ["/Applications/donor/donor-app", "--x"],
        "RunAtLoad": True,
        "KeepAlive": False,
        "LimitLoadToSessionType": "Aqua",
        "ProcessType": "Interactive",
    }


def test_where_the_file_goes(tmp_path: Path) -> None:
    home = tmp_path / "home"
    assert autostart_file("linux", {}, home) == home / ".config/autostart/donor-app.desktop"
    assert autostart_file("linux", {"XDG_CONFIG_HOME": "/x/cfg"}, home) == Path(
        "/x/cfg/autostart/donor-app.desktop"
    )
    assert autostart_file("darwin", {}, home) == (
        home / "Library/LaunchAgents/org.donor_app.tray.plist"
    )
    assert autostart_file("win32", {}, home) is None


def test_tray_command_prefers_the_script_beside_the_interpreter(tmp_path: Path) -> None:
    python = tmp_path / "bin" / "python"
    python.parent.mkdir()
    assert tray_command(str(python)) == [str(python), "-m", "donor_app.gui"]
    (tmp_path / "bin" / "donor-app").write_text("#!/bin/sh\n")
    assert tray_command(str(python)) == [str(tmp_path / "bin" / "donor-app")]


@pytest.mark.parametrize("platform", ["linux", "darwin"])
def test_enable_and_disable_write_and_remove_the_file(tmp_path: Path, platform: str) -> None:
    autostart = Autostart(platform=platform, environ={}, home=tmp_path)
    assert not autostart.is_enabled()
    autostart.enable(["/opt/donor-app"])
    assert autostart.is_enabled()
    file = autostart_file(platform, {}, tmp_path)
    assert file is not None
    expected = (
        launch_agent_plist(["/opt/donor-app"])
        if platform == "darwin"
        else xdg_desktop_entry(["/opt/donor-app"]).encode()
    )
    assert file.read_bytes() == expected
    assert [p.name for p in file.parent.iterdir()] == [file.name]  # no temporary left
    autostart.disable()
    autostart.disable()  # idempotent
    assert not autostart.is_enabled()
