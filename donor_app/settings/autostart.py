"""Starting the tray when the owner logs in: the XDG autostart file (Linux and other
freedesktop systems), the Windows Run key, a macOS LaunchAgent.

What gets written is produced by pure functions (`xdg_desktop_entry`, `windows_run_entry`,
`launch_agent_plist`), unit-tested for the exact text, value or plist; `enable()`,
`disable()` and `is_enabled()` are the thin part that touches the disk or the registry.
Paths and the environment are injected, nothing happens at import.
"""

from __future__ import annotations

import os
import plistlib
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from donor_app.atomic_file import write_atomic

APP_ID = "donor-app"
LAUNCH_AGENT_LABEL = "org.donor_app.tray"
RUN_KEY = r"Software\Microsoft\Windows\CurrentVersion\Run"
RUN_VALUE_NAME = "donor_app"

# Characters that make the desktop-entry spec require an argument to be quoted.
_RESERVED = set(" \t\n\"'\\><~|&;$*?#()`")
# Inside a quoted argument these are escaped with a backslash.
_ESCAPED_IN_QUOTES = set('"`$\\')


def tray_command(executable: str = sys.executable) -> list[str]:
    """How to start the tray: the `donor-app` script beside the interpreter if there is
    one (a virtualenv's, an installed package's), else `python -m donor_app.gui`."""
    folder = Path(executable).parent
    for name in ("donor-app", "donor-app.exe"):
        if (folder / name).is_file():
            return [str(folder / name)]
    return [executable, "-m", "donor_app.gui"]


def _desktop_exec(command: Sequence[str]) -> str:
    """`command` as a desktop entry's Exec value (quoting, then %% and \\\\ escapes)."""
    words = []
    for arg in command:
        if "\n" in arg or "\r" in arg:
            raise ValueError(f"command: an argument contains a line break: {arg!r}")
        word = arg
        if not arg or any(char in _RESERVED for char in arg):
            quoted = "".join("\\" + c if c in _ESCAPED_IN_QUOTES else c for c in arg)
            word = f'"{quoted}"'
        words.append(word.replace("%", "%%"))
    # The string-level escape is applied on top of the quoting rule (spec, "Exec key").
    return " ".join(words).replace("\\", "\\\\")


def xdg_desktop_entry(command: Sequence[str]) -> str:
    """The autostart `.desktop` file that runs `command` at login."""
    if not command:
        raise ValueError("command: empty")
    return (
        "[Desktop Entry]\n"
        "Type=Application\n"
        "Name=donor_app\n"
        "Comment=Lend this computer's idle CPU and RAM; shows what is lent and why\n"
        f"Exec={_desktop_exec(command)}\n"
        "Icon=donor-app\n"
        "Terminal=false\n"
        "Categories=Utility;\n"
        "X-GNOME-Autostart-enabled=true\n"
    )


@dataclass(frozen=True, slots=True)
class RunEntry:
    """A value under HKEY_CURRENT_USER\\`key` (REG_SZ)."""

    key: str
    name: str
    value: str


def windows_run_entry(command: Sequence[str]) -> RunEntry:
    """The Run-key value that starts `command` at login (quoted the Windows way)."""
    if not command:
        raise ValueError("command: empty")
    return RunEntry(RUN_KEY, RUN_VALUE_NAME, subprocess.list2cmdline(list(command)))


def launch_agent_plist(command: Sequence[str]) -> bytes:
    """A per-user LaunchAgent that starts `command` once at login, in the GUI session."""
    if not command:
        raise ValueError("command: empty")
    return plistlib.dumps(
        {
            "Label": LAUNCH_AGENT_LABEL,
            "ProgramArguments": list(command),
            "RunAtLoad": True,
            # Quitting the tray is the owner's choice: do not restart it.
            "KeepAlive": False,
            "LimitLoadToSessionType": "Aqua",
            "ProcessType": "Interactive",
        }
    )


# --- the thin part ------------------------------------------------------------------


def autostart_file(platform: str, environ: Mapping[str, str], home: Path) -> Path | None:
    """Where the autostart file lives on `platform` (None on Windows: the registry)."""
    if platform == "win32":
        return None
    if platform == "darwin":
        return home / "Library" / "LaunchAgents" / f"{LAUNCH_AGENT_LABEL}.plist"
    config = environ.get("XDG_CONFIG_HOME") or str(home / ".config")
    return Path(config) / "autostart" / f"{APP_ID}.desktop"


@dataclass(frozen=True)
class Autostart:
    """Autostart for one user: `platform`, `environ`, `home` default to this process's."""

    platform: str = sys.platform
    environ: Mapping[str, str] | None = None
    home: Path | None = None

    def _file(self) -> Path | None:
        environ = os.environ if self.environ is None else self.environ
        return autostart_file(self.platform, environ, self.home or Path.home())

    def enable(self, command: Sequence[str]) -> None:
        """Start `command` at each login. Raises OSError if it cannot be written."""
        file = self._file()
        if file is None:
            _write_run_value(windows_run_entry(command))
            return
        content = (
            launch_agent_plist(command)
            if self.platform == "darwin"
            else xdg_desktop_entry(command).encode()
        )
        file.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(file, content, 0o644)

    def disable(self) -> None:
        """No autostart (idempotent)."""
        file = self._file()
        if file is None:
            _delete_run_value(RUN_KEY, RUN_VALUE_NAME)
        else:
            file.unlink(missing_ok=True)

    def is_enabled(self) -> bool:
        file = self._file()
        if file is None:
            return _read_run_value(RUN_KEY, RUN_VALUE_NAME) is not None
        return file.is_file()


def _write_run_value(entry: RunEntry) -> None:
    if sys.platform != "win32":
        raise OSError("the Run key exists on Windows only")
    import winreg  # noqa: PLC0415

    with winreg.CreateKey(winreg.HKEY_CURRENT_USER, entry.key) as key:
        winreg.SetValueEx(key, entry.name, 0, winreg.REG_SZ, entry.value)


def _delete_run_value(key_path: str, name: str) -> None:
    if sys.platform != "win32":
        raise OSError("the Run key exists on Windows only")
    import winreg  # noqa: PLC0415

    try:
        with winreg.OpenKey(winreg.HKEY_CURRENT_USER, key_path, 0, winreg.KEY_SET_VALUE) as key:
            winreg.DeleteValue(key, name)
    except FileNotFoundError:
        return


def _read_run_value(key_path: str, name: str) -> str | None:
    if sys.platform != "win32":
        raise OSError("the Run key exists on Windows only")
    import winreg  # noqa: PLC0415

    try:
        with winreg.OpenKey(winreg.HKEY_CURRENT_USER, key_path) as key:
            value, _ = winreg.QueryValueEx(key, name)
    except FileNotFoundError:
        return None
    return str(value)
