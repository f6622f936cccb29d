"""Entry points. Thin: parse arguments, set up logging, call the part that does the work.

A user's mistake (a bad flag, an invalid config, no libvirt) ends with one clear line and
a non-zero exit code, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from donor_app.agent.local_api import AgentAlreadyRunning
from donor_app.agent.main import AgentOptions, default_libvirt_uri, run_agent
from donor_app.domain.status import AgentStatus, status_line
from donor_app.hypervisor.errors import HypervisorError
from donor_app.settings.config import ConfigError, LinkConfig, parse_link_config
from donor_app.settings.paths import Paths, default_paths, system_paths

log = logging.getLogger("donor_app")

EXIT_USAGE = 2
EXIT_FAILURE = 1


def _agent_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="donor-agent",
        description="Lend this computer's idle CPU and RAM to sandboxed guests, owner first.",
    )
    parser.add_argument("--config", type=Path, help="the owner's settings.toml")
    parser.add_argument("--fleet-config", type=Path, help="the administrator's fleet.toml")
    parser.add_argument("--data-dir", type=Path, help="history, guest state (and libvirt root)")
    parser.add_argument("--cache-dir", type=Path, help="the image cache")
    parser.add_argument(
        "--libvirt-uri",
        help="default: qemu:///system if libvirtd runs, "
        "else an embedded driver (root) or qemu:///session",
    )
    parser.add_argument("--socket", type=Path, help="the local API's Unix socket")
    parser.add_argument(
        "--socket-owner",
        type=int,
        metavar="UID",
        help="the desk owner's uid (a system agent hands the socket over)",
    )
    parser.add_argument(
        "--watch-input",
        choices=("auto", "on", "off"),
        default="auto",
        help="listen to keyboard/mouse here (auto: when a display is set)",
    )
    parser.add_argument("--virt-type", choices=("kvm", "qemu"), help="override probing")
    parser.add_argument("--demo-kernel", type=Path, help="run the tiny demo guest: its kernel")
    parser.add_argument("--demo-initrd", type=Path, help="and its initrd")
    parser.add_argument(
        "--demo-guests",
        type=int,
        default=1,
        choices=range(1, 9),
        metavar="N",
        help="how many demo guests (1-8)",
    )
    parser.add_argument(
        "--demo-mode",
        choices=("burn", "sleep"),
        default="burn",
        help="demo guests burn CPU (default) or sleep",
    )
    parser.add_argument(
        "--status-line", action="store_true", help="print a live status line on stdout"
    )
    parser.add_argument(
        "--coordinator",
        metavar="HOST:PORT",
        help="join this coordinator (default: the fleet file's [coordinator] table)",
    )
    parser.add_argument("--coordinator-ca", type=Path, help="the coordinator's CA certificate")
    parser.add_argument("--enroll-address", metavar="HOST:PORT", help="default: HOST:7444")
    parser.add_argument("--enroll-token", help="enrollment token (used once)")
    parser.add_argument(
        "--migration-libvirt-uri",
        metavar="URI",
        help="this host's libvirt as other donors reach it, to receive live migrations",
    )
    parser.add_argument(
        "--migration-uri", metavar="tcp://HOST", help="where migration streams connect"
    )
    parser.add_argument("--user-agent", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR")
    )
    return parser


def _link_config(args: argparse.Namespace) -> LinkConfig | None:
    """From --coordinator & co.; None without --coordinator. ConfigError names the flag."""
    if not args.coordinator:
        return None
    flags = Path("command line")
    data: dict[str, object] = {"address": args.coordinator}
    if args.coordinator_ca is None:
        raise ConfigError(flags, "--coordinator-ca", "is required with --coordinator")
    data["ca_file"] = str(args.coordinator_ca)
    if args.enroll_address:
        data["enroll_address"] = args.enroll_address
    if args.enroll_token:
        data["token"] = args.enroll_token
    tables: dict[str, object] = {"coordinator": data}
    if args.migration_libvirt_uri or args.migration_uri:
        tables["migration"] = {
            "libvirt_uri": args.migration_libvirt_uri or "",
            "migrate_uri": args.migration_uri or "",
        }
    return parse_link_config(tables, flags)


def _agent_options(args: argparse.Namespace) -> AgentOptions:
    link_config = _link_config(args)
    base: Paths = system_paths() if os.geteuid() == 0 else default_paths()
    paths = Paths(
        config_dir=args.config.parent if args.config else base.config_dir,
        site_config_dir=args.fleet_config.parent if args.fleet_config else base.site_config_dir,
        data_dir=args.data_dir or base.data_dir,
        cache_dir=args.cache_dir or base.cache_dir,
        runtime_dir=args.socket.parent if args.socket else base.runtime_dir,
    )
    return AgentOptions(
        paths=paths,
        libvirt_uri=args.libvirt_uri or default_libvirt_uri(paths),
        socket=args.socket or paths.socket_file,
        settings_file=args.config or paths.settings_file,
        fleet_file=args.fleet_config or paths.fleet_file,
        socket_owner_uid=args.socket_owner,
        watch_input=args.watch_input,
        virt_type=args.virt_type,
        demo_kernel=args.demo_kernel,
        demo_initrd=args.demo_initrd,
        demo_guests=args.demo_guests,
        demo_mode=args.demo_mode,
        user_agent=args.user_agent,
        link_config=link_config,
    )


class _StatusPrinter:
    """Rewrites one terminal line in place; on a pipe, prints a line per change."""

    def __init__(self) -> None:
        self._tty = sys.stdout.isatty()
        self._last = ""

    def __call__(self, status: AgentStatus) -> None:
        line = status_line(status)
        if self._tty:
            sys.stdout.write("\r\x1b[2K" + line[: os.get_terminal_size().columns - 1])
        elif line != self._last:
            sys.stdout.write(line + "\n")
        sys.stdout.flush()
        self._last = line


def agent_main(argv: list[str] | None = None) -> int:
    args = _agent_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if bool(args.demo_kernel) != bool(args.demo_initrd):
        log.error("--demo-kernel and --demo-initrd go together")
        return EXIT_USAGE
    try:
        options = _agent_options(args)
    except ConfigError as exc:
        log.error("%s", exc)
        return EXIT_USAGE
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    try:
        run_agent(options, stop, _StatusPrinter() if args.status_line else None)
    except AgentAlreadyRunning as exc:
        log.error("%s; not starting a second agent", exc)
        return EXIT_FAILURE
    except HypervisorError as exc:
        log.error("%s", exc)
        return EXIT_FAILURE
    if args.status_line and sys.stdout.isatty():
        sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(agent_main())
