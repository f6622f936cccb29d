"""`donor-coordinator`: serve, and the admin subcommands over the Admin API.

Admin subcommands find the coordinator and the admin credential through the
`endpoints.json` a running coordinator writes into its data dir (the same machine), or
through --address/--ca/--admin-cert/--admin-key (anywhere). A refusal prints the
coordinator's reason on one line and exits 1; a usage mistake exits 2.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import signal
import sys
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

from donor_app.coordinator.admin_client import AdminClient, AdminCredential, AdminError
from donor_app.coordinator.fleet import FleetConfig
from donor_app.coordinator.pki import EnrollmentError
from donor_app.coordinator.server import CoordinatorServer, Endpoints, ServeOptions
from donor_app.coordinator.store.ports import StoreError
from donor_app.domain.admin_views import DonorView
from donor_app.domain.link import Capacity, MigrationLimits
from donor_app.domain.records import WorkloadEvent, WorkloadRecord
from donor_app.domain.vm import DiskBoot, KernelBoot, VmSpec
from donor_app.logs import configure
from donor_app.settings.paths import default_paths, system_paths

log = logging.getLogger("donor_app.coordinator")

EXIT_FAILURE = 1
EXIT_USAGE = 2
_DURATION = re.compile(r"^(\d+)([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class UsageError(Exception):
    """The command line asks for something impossible (exit 2)."""


class SpecRefused(Exception):
    """The workload's values are ones the coordinator refuses (exit 1, as its refusal)."""


def default_data_dir() -> Path:
    base = system_paths() if os.geteuid() == 0 else default_paths()
    return base.data_dir / "coordinator"


def duration(text: str) -> timedelta:
    """'90s', '30m', '1h', '7d'."""
    match = _DURATION.fullmatch(text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 90s, 30m, 1h or 7d")
    return timedelta(seconds=int(match.group(1)) * _UNITS[match.group(2)])


def _bounded_int(flag: str, low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag}: {text!r} is not a whole number") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{flag}: {value} is outside {low}–{high}")
        return value

    return parse


def _add_move_options(serve: argparse.ArgumentParser) -> None:
    serve.add_argument(
        "--migration-bandwidth",
        type=_bounded_int("--migration-bandwidth", 0, 100_000),
        default=0,
        metavar="MIB_PER_S",
        help="cap on a live migration's stream (0: unlimited, the default)",
    )
    serve.add_argument(
        "--migration-max-downtime",
        type=_bounded_int("--migration-max-downtime", 1, 60_000),
        default=MigrationLimits().max_downtime_ms,
        metavar="MS",
        help=(
            "QEMU's budget for the final copy of a live migration (default: %(default)s ms);"
            " the guest also waits for the switch-over, ~70-100 ms more on loopback"
        ),
    )
    serve.add_argument(
        "--migration-deadline",
        type=duration,
        default=timedelta(seconds=60),
        help="a live migration not done by then is aborted and the move goes cold",
    )
    serve.add_argument(
        "--migration-tls", action="store_true", help="encrypt migration streams (libvirt TLS)"
    )
    serve.add_argument(
        "--checkpoint-interval",
        type=duration,
        default=timedelta(minutes=15),
        help="checkpoint running workloads this often (0s: never; default 15m)",
    )


def _add_history_and_move(workload: Any, output: argparse.ArgumentParser) -> None:
    history = workload.add_parser(
        "history", help="where a workload ran and how it moved", parents=[output]
    )
    history.add_argument("id")
    move = workload.add_parser("move", help="move a workload to another donor", parents=[output])
    move.add_argument("id")
    move.add_argument("--to", default="", metavar="DONOR", help="default: the best idle donor")
    move.add_argument("--cold", action="store_true", help="through a checkpoint, not live")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="donor-coordinator", description="The donor fleet's coordinator and its admin tool."
    )
    parser.add_argument("--data-dir", type=Path, default=None, help="default: %(default)s")
    parser.add_argument(
        "--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR")
    )
    parser.add_argument("--log-format", default="text", choices=("text", "json"))
    parser.add_argument("--address", help="the coordinator's main port (admin commands)")
    parser.add_argument("--ca", type=Path, help="the coordinator's CA certificate")
    parser.add_argument("--admin-cert", type=Path)
    parser.add_argument("--admin-key", type=Path)
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    commands = parser.add_subparsers(dest="command", required=True)
    # --json also after the subcommand (`workload list --json`); SUPPRESS keeps a value
    # given before it.
    output = argparse.ArgumentParser(add_help=False)
    output.add_argument("--json", action="store_true", default=argparse.SUPPRESS)

    serve = commands.add_parser("serve", help="run the coordinator")
    serve.add_argument("--listen", default="0.0.0.0:7443", help="donors and admin (mTLS)")
    serve.add_argument("--enroll-listen", default="0.0.0.0:7444", help="enrollment (TLS)")
    serve.add_argument("--metrics-listen", default="127.0.0.1:9464", help="'' to disable")
    serve.add_argument("--store-url", help="SQLAlchemy URL; default: SQLite in the data dir")
    serve.add_argument(
        "--hostname",
        action="append",
        default=[],
        help="a name donors use to reach this host (repeatable; localhost is always added)",
    )
    serve.add_argument("--lease-ttl", type=duration, default=timedelta(seconds=30))
    serve.add_argument("--report-interval", type=duration, default=timedelta(seconds=5))
    _add_move_options(serve)

    token = commands.add_parser("token", help="enrollment tokens").add_subparsers(
        dest="action", required=True
    )
    create = token.add_parser("create", help="make an enrollment token", parents=[output])
    create.add_argument("--ttl", type=duration, default=timedelta(hours=1))
    create.add_argument("--uses", type=int, default=1, help="1 = single use (default)")
    create.add_argument("--note", default="")

    workload = commands.add_parser("workload", help="workloads").add_subparsers(
        dest="action", required=True
    )
    submit = workload.add_parser(
        "submit", help="upload images and queue a workload", parents=[output]
    )
    submit.add_argument("--name", required=True)
    submit.add_argument("--vcpus", type=int, default=1)
    submit.add_argument("--memory-mib", type=int, default=256)
    submit.add_argument("--arch", default="x86_64")
    submit.add_argument("--priority", type=int, default=0)
    submit.add_argument("--kernel", type=Path, help="kernel file (direct kernel boot)")
    submit.add_argument("--initrd", type=Path)
    submit.add_argument("--cmdline", default="console=ttyS0")
    submit.add_argument("--disk", type=Path, help="qcow2 base image (instead of --kernel)")
    submit.add_argument("--network", action="store_true", help="an isolated network")
    workload.add_parser("list", help="all workloads, where they run", parents=[output])
    cancel = workload.add_parser("cancel", help="stop a workload everywhere", parents=[output])
    cancel.add_argument("id")
    _add_history_and_move(workload, output)

    donor = commands.add_parser("donor", help="donors").add_subparsers(dest="action", required=True)
    donor.add_parser("list", help="enrolled donors", parents=[output])
    for action, text in (("drain", "no new work; move its work away"), ("revoke", "refuse it")):
        one = donor.add_parser(action, help=text, parents=[output])
        one.add_argument("id")
    return parser


def _serve(args: argparse.Namespace, data_dir: Path) -> int:
    options = ServeOptions(
        data_dir=data_dir,
        listen=args.listen,
        enroll_listen=args.enroll_listen,
        metrics_listen=args.metrics_listen or None,
        store_url=args.store_url,
        hostnames=tuple(dict.fromkeys(["localhost", "127.0.0.1", *args.hostname])),
        fleet=FleetConfig(
            lease_ttl=args.lease_ttl,
            report_interval=args.report_interval,
            migration=MigrationLimits(
                bandwidth_mibps=args.migration_bandwidth,
                max_downtime_ms=args.migration_max_downtime,
                deadline_s=max(1, int(args.migration_deadline.total_seconds())),
                tls=args.migration_tls,
            ),
            checkpoint_interval=args.checkpoint_interval or None,
        ),
    )

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        server = CoordinatorServer(options)
        await server.start()
        try:
            await stop.wait()
        finally:
            await server.stop()

    try:
        asyncio.run(run())
    except (EnrollmentError, StoreError, ValueError, OSError, RuntimeError) as error:
        log.error("cannot serve: %s", error)
        return EXIT_FAILURE
    return 0


def _client(args: argparse.Namespace, data_dir: Path) -> AdminClient:
    if args.address:
        if not (args.ca and args.admin_cert and args.admin_key):
            raise UsageError("--address needs --ca, --admin-cert and --admin-key")
        credential = AdminCredential.from_files(args.ca, args.admin_cert, args.admin_key)
        return AdminClient(args.address, credential)
    try:
        endpoints = Endpoints.load(data_dir)
    except FileNotFoundError:
        raise UsageError(
            f"no coordinator has run with data dir {data_dir}: give --data-dir, or --address"
            " with --ca/--admin-cert/--admin-key",
        ) from None
    credential = AdminCredential.from_files(
        args.ca or endpoints.ca_file,
        args.admin_cert or endpoints.admin_cert_file,
        args.admin_key or endpoints.admin_key_file,
    )
    return AdminClient(endpoints.address, credential)


def _submit(client: AdminClient, args: argparse.Namespace) -> WorkloadRecord:
    if bool(args.kernel) == bool(args.disk):
        raise UsageError("give --kernel (with --initrd) or --disk")
    boot: KernelBoot | DiskBoot
    try:
        if args.kernel:
            kernel = client.upload_image(args.kernel)
            initrd = client.upload_image(args.initrd) if args.initrd else None
            # An empty command line or arch means the coordinator's defaults.
            boot = KernelBoot(kernel, initrd, args.cmdline or "console=ttyS0")
        else:
            boot = DiskBoot(client.upload_image(args.disk))
        spec = VmSpec(
            name=args.name,
            vcpus=args.vcpus,
            memory_mib=args.memory_mib,
            boot=boot,
            network=args.network,
            arch=args.arch or "x86_64",
        )
    except ValueError as error:
        # Worded as the coordinator words a spec it refuses.
        raise SpecRefused(f"spec.{error}") from None
    return client.submit(spec, args.priority)


def _print_workloads(workloads: Sequence[WorkloadRecord], as_json: bool) -> None:
    rows = [
        {
            "id": w.workload_id,
            "name": w.spec.name,
            "state": w.state.value,
            "donor": w.donor_id or "",
            "epoch": w.epoch,
            "vcpus": w.spec.vcpus,
            "memory_mib": w.spec.memory_mib,
            "detail": w.detail,
            "checkpoint": {
                "sha256": w.checkpoint.sha256,
                "size": w.checkpoint.size,
                "epoch": w.checkpoint.epoch,
                "taken_at": w.checkpoint.taken_at.isoformat(),
                "donor": w.checkpoint.donor_id,
            }
            if w.checkpoint is not None
            else None,
        }
        for w in workloads
    ]
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'ID':<20} {'NAME':<16} {'STATE':<13} {'DONOR':<20} {'EPOCH':>5}  DETAIL")
    for r in rows:
        print(
            f"{r['id']:<20} {r['name']:<16} {r['state']:<13} {r['donor'] or '-':<20}"
            f" {r['epoch']:>5}  {r['detail']}"
        )


def _print_history(history: tuple[WorkloadRecord, Sequence[WorkloadEvent]], as_json: bool) -> None:
    workload, events = history
    rows = [
        {
            "at": e.at.isoformat(),
            "kind": e.kind,
            "donor": e.donor_id or "",
            "epoch": e.epoch,
            "detail": e.detail,
        }
        for e in events
    ]
    if as_json:
        print(json.dumps({"workload": workload.workload_id, "events": rows}, indent=2))
        return
    _print_workloads([workload], as_json=False)
    print()
    print(f"{'AT':<26} {'EVENT':<20} {'DONOR':<20} {'EPOCH':>5}  DETAIL")
    for r in rows:
        print(
            f"{r['at']:<26} {r['kind']:<20} {r['donor'] or '-':<20} {r['epoch']:>5}  {r['detail']}"
        )


def _print_donors(donors: Sequence[DonorView], as_json: bool) -> None:
    # A donor that has not reported yet shows zeros, as the wire's empty capacity does.
    none = Capacity(cores=0, memory_mib=0, arch="")
    rows: list[dict[str, Any]] = []
    for d in donors:
        capacity = d.capacity or none
        rows.append(
            {
                "id": d.donor_id,
                "hostname": d.hostname,
                "connected": d.connected,
                "flags": list(d.flags),
                "cores": capacity.cores,
                "memory_mib": capacity.memory_mib,
                "lend_cpu_percent": capacity.lend_cpu_percent,
                "idle": capacity.idle,
                "last_seen": d.last_seen.isoformat() if d.last_seen is not None else None,
                "workloads": list(d.workload_ids),
            }
        )
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'ID':<20} {'HOST':<20} {'STATE':<12} {'LEND':>6}  WORKLOADS")
    for r in rows:
        state = ",".join(r["flags"]) or ("connected" if r["connected"] else "offline")
        print(
            f"{r['id']:<20} {r['hostname']:<20} {state:<12} {r['lend_cpu_percent']:>5.0f}%"
            f"  {' '.join(r['workloads']) or '-'}"
        )


def _admin(args: argparse.Namespace, data_dir: Path) -> int:
    with _client(args, data_dir) as client:
        if args.command == "token":
            token = client.create_token(int(args.ttl.total_seconds()), args.uses, args.note)
            expires = token.expires_at.isoformat()
            if args.json:
                print(json.dumps({"token": token.token, "expires_at": expires, "uses": token.uses}))
            else:
                print(token.token)
                print(f"# {token.uses} use(s), expires {expires}", file=sys.stderr)
        elif args.command == "workload" and args.action == "submit":
            workload_id = _submit(client, args).workload_id
            print(workload_id if not args.json else json.dumps({"id": workload_id}))
        elif args.command == "workload" and args.action == "list":
            _print_workloads(client.workloads(), args.json)
        elif args.command == "workload" and args.action == "move":
            _print_workloads([client.move(args.id, args.to, args.cold)], args.json)
        elif args.command == "workload" and args.action == "history":
            _print_history(client.history(args.id), args.json)
        elif args.command == "workload":
            _print_workloads([client.cancel(args.id)], args.json)
        elif args.action == "list":
            _print_donors(client.donors(), args.json)
        elif args.action == "drain":
            _print_donors([client.drain(args.id)], args.json)
        else:
            _print_donors([client.revoke(args.id)], args.json)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    configure(args.log_level, args.log_format)
    data_dir = args.data_dir or default_data_dir()
    if args.command == "serve":
        return _serve(args, data_dir)
    try:
        return _admin(args, data_dir)
    except UsageError as error:
        print(f"donor-coordinator: {error}", file=sys.stderr)
        return EXIT_USAGE
    except (AdminError, SpecRefused) as error:
        print(f"donor-coordinator: {error}", file=sys.stderr)
        return EXIT_FAILURE
    except OSError as error:
        print(f"donor-coordinator: {error}", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    raise SystemExit(main())
