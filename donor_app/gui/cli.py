"""`donor-app`: the tray. Thin: parse arguments, take the per-user lock, find (or start)
the agent, run the Qt event loop. A user's mistake ends with one clear line and a
non-zero exit code, never a traceback."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket as sockets
from pathlib import Path

from donor_app.gui.agent_launcher import StartedAgent, choose_socket, start_user_agent
from donor_app.gui.single_instance import AlreadyRunning, InstanceLock
from donor_app.settings.autostart import Autostart, tray_command
from donor_app.settings.paths import default_paths, system_paths

log = logging.getLogger("donor_app")

EXIT_FAILURE = 1
LOCK_FILE = "donor-app.lock"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="donor-app",
        description="The donor_app tray: what this computer lends, why, and your settings.",
    )
    parser.add_argument(
        "--socket",
        type=Path,
        help="the agent's local API socket (default: the system agent's, else your own)",
    )
    parser.add_argument(
        "--no-start-agent",
        action="store_true",
        help="never start a user-level agent; wait for one to answer",
    )
    parser.add_argument(
        "--agent-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="an argument for the user-level agent donor-app starts (repeatable), "
        "e.g. --agent-arg=--demo-kernel --agent-arg=/path/to/vmlinuz",
    )
    parser.add_argument(
        "--no-input",
        action="store_true",
        help="do not watch keyboard/mouse activity here (the agent then relies on "
        "its own idle counter)",
    )
    parser.add_argument(
        "--autostart",
        choices=("on", "off"),
        help="start donor-app at login (on) or not (off), then exit",
    )
    parser.add_argument(
        "--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR")
    )
    return parser


def _socket_candidates(explicit: Path | None) -> list[Path]:
    if explicit is not None:
        return [explicit]
    candidates = [system_paths().socket_file, default_paths().socket_file]
    return list(dict.fromkeys(candidates))


def _user_socket(explicit: Path | None) -> Path:
    """Where a user-level agent started by the tray serves (the same as the agent's own
    default for this user)."""
    if explicit is not None:
        return explicit
    return system_paths().socket_file if os.geteuid() == 0 else default_paths().socket_file


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.autostart is not None:
        return _set_autostart(args.autostart == "on")

    lock = InstanceLock(default_paths().runtime_dir / LOCK_FILE)
    try:
        lock.acquire()
    except AlreadyRunning as exc:
        log.error("%s; not starting a second tray", exc)
        return EXIT_FAILURE
    except OSError as exc:
        log.error("cannot take the per-user lock %s: %s", lock.path, exc)
        return EXIT_FAILURE

    socket = choose_socket(_socket_candidates(args.socket))
    started: StartedAgent | None = None
    if socket is None:
        socket = _user_socket(args.socket)
        if args.no_start_agent:
            log.info("no agent answers on %s; waiting for one (--no-start-agent)", socket)
        else:
            try:
                started = start_user_agent(
                    socket, args.agent_arg, default_paths().data_dir / "user-agent.log"
                )
            except OSError as exc:
                log.error("cannot start a user-level agent: %s", exc)
                return EXIT_FAILURE
    else:
        log.info("agent found on %s", socket)
    try:
        return _run_tray(socket, started, watch_input=not args.no_input)
    finally:
        lock.release()


def _run_tray(socket: Path, started: StartedAgent | None, *, watch_input: bool) -> int:
    # Qt is imported here: `--help` and `--autostart` work without Qt or a display.
    from PySide6.QtCore import QSocketNotifier  # noqa: PLC0415
    from PySide6.QtWidgets import QApplication  # noqa: PLC0415

    from donor_app.activity.factory import make_input_listener  # noqa: PLC0415
    from donor_app.gui.app import TrayApp, TrayOptions  # noqa: PLC0415
    from donor_app.gui.icons import APP_ICON, icon  # noqa: PLC0415

    # argv[0] names the X11 WM_CLASS instance; under `python -m` it would be __main__.py.
    app = QApplication(["donor-app"])
    app.setApplicationName("donor_app")
    app.setDesktopFileName("donor-app")
    app.setWindowIcon(icon(APP_ICON))
    # A tray app lives on after its last window (settings, activity) is closed.
    app.setQuitOnLastWindowClosed(False)
    tray = TrayApp(
        TrayOptions(
            socket=socket,
            started_agent=started,
            input_listener=make_input_listener() if watch_input else None,
            autostart=Autostart(),
            autostart_command=tray_command(),
        )
    )
    # SIGTERM/SIGINT end the event loop cleanly. Python runs signal handlers only when
    # it gets control, and the Qt loop is C++: the wakeup fd makes Qt call into Python
    # as soon as a signal arrives, with no polling timer (no idle wake-ups).
    reader, writer = sockets.socketpair()
    reader.setblocking(False)
    writer.setblocking(False)
    signal.set_wakeup_fd(writer.fileno())
    notifier = QSocketNotifier(reader.fileno(), QSocketNotifier.Type.Read)
    notifier.activated.connect(lambda *_: reader.recv(64))
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: tray.quit())
    tray.start()
    try:
        return app.exec()
    finally:
        tray.stop()
        signal.set_wakeup_fd(-1)
        reader.close()
        writer.close()


def _set_autostart(on: bool) -> int:
    autostart = Autostart()
    try:
        if on:
            autostart.enable(tray_command())
        else:
            autostart.disable()
    except OSError as exc:
        log.error("cannot change starting at login: %s", exc)
        return EXIT_FAILURE
    log.info("donor-app %s at login", "starts" if on else "no longer starts")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
