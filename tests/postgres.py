"""A private PostgreSQL server for tests and benchmarks.

`running_postgres(base)` runs initdb in a fresh directory, starts a server on a free
loopback port with its Unix socket in that directory, waits until it accepts
connections, yields a SQLAlchemy URL (`postgresql+psycopg://...`, superuser
"postgres" with a random password) and stops the server at the end.
`fresh_database(server_url)` makes one empty database on it for a test.

PostgreSQL refuses to run as root; CI runs as root, so there the server runs as the
`postgres` system user (created by Debian's `postgresql` package, which
scripts/bootstrap installs) in a directory under the system temp dir: pytest's own
temp dirs are 0700 root and the postgres user could not enter them.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import secrets
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from tests.net import free_port
from tests.waiting import wait_for

PG_ROOT = Path("/usr/lib/postgresql")
START_TIMEOUT_S = 60.0
SERVER_USER = "postgres"


def postgres_bindir() -> Path:
    """The bin directory of the newest PostgreSQL under /usr/lib/postgresql (or
    $DONOR_PG_BINDIR). AssertionError naming the fix when none is installed, so a test
    run fails instead of silently skipping the PostgreSQL half of the contract suite."""
    override = os.environ.get("DONOR_PG_BINDIR")
    candidates = [Path(override)] if override else []
    if PG_ROOT.is_dir():
        versions = [p for p in PG_ROOT.iterdir() if re.fullmatch(r"\d+(\.\d+)?", p.name)]
        versions.sort(key=lambda p: tuple(int(x) for x in p.name.split(".")), reverse=True)
        candidates += [p / "bin" for p in versions]
    for bindir in candidates:
        if (bindir / "postgres").is_file() and (bindir / "initdb").is_file():
            return bindir
    raise AssertionError(
        f"no PostgreSQL server binaries found under {PG_ROOT}/*/bin"
        " (install the Debian package `postgresql`, as scripts/bootstrap does,"
        " or set DONOR_PG_BINDIR)"
    )


class _Runner:
    """Runs the PostgreSQL programs as the right user (see the module docstring)."""

    def __init__(self, bindir: Path, workdir: Path) -> None:
        self.bindir = bindir
        self.workdir = workdir
        self.as_root = os.geteuid() == 0
        self.kwargs: dict[str, Any] = {}
        if self.as_root:
            try:
                entry = pwd.getpwnam(SERVER_USER)
            except KeyError:
                raise AssertionError(
                    f"running as root and there is no `{SERVER_USER}` user to run PostgreSQL"
                    " (install the Debian package `postgresql`)"
                ) from None
            # subprocess switches user in the child (no preexec_fn: unsafe with threads).
            self.kwargs = {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}
            os.chown(workdir, entry.pw_uid, entry.pw_gid)

    def run(self, program: str, *args: str, timeout: float = 120.0) -> str:
        result = subprocess.run(
            [str(self.bindir / program), *args],
            # The server's user may not be allowed into the caller's cwd.
            cwd=self.workdir,
            env={**os.environ, "LC_ALL": "C", "PGTZ": "UTC"},
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            **self.kwargs,
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"{program} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
            )
        return result.stdout


def _accepts_connections(url: str) -> bool:
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        return True
    except Exception:
        return False
    finally:
        engine.dispose()


@contextlib.contextmanager
def running_postgres(base: Path, *, start_attempts: int = 3) -> Iterator[str]:
    """A private PostgreSQL server for the duration of the block; yields its URL.

    `base`: where the server's directory goes when not running as root (as root, the
    system temp dir; see the module docstring). The server is tuned for tests
    (fsync off): its data does not survive a crash, which a test never needs.
    """
    bindir = postgres_bindir()
    as_root = os.geteuid() == 0
    # Short path: the Unix socket path must stay under 108 bytes.
    workdir = Path(tempfile.mkdtemp(prefix="pg-", dir=None if as_root else base))
    runner = _Runner(bindir, workdir)
    data = workdir / "data"
    password = secrets.token_hex(16)
    pwfile = workdir / "pwfile"
    pwfile.write_text(password + "\n")
    if as_root:
        os.chown(pwfile, runner.kwargs["user"], runner.kwargs["group"])
    pwfile.chmod(0o600)
    started = False
    try:
        runner.run(
            "initdb",
            "-D",
            str(data),
            "-U",
            SERVER_USER,
            f"--pwfile={pwfile}",
            "--auth-local=trust",  # the socket is in our private directory
            "--auth-host=scram-sha-256",  # other local users can reach the TCP port
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
            "--no-instructions",
        )
        pwfile.unlink()
        port = 0
        for attempt in range(start_attempts):
            # Another process could take the port before the server binds it: a
            # failed start is retried with a new one.
            port = free_port()
            options = " ".join(
                [
                    "-c listen_addresses=127.0.0.1",
                    f"-c port={port}",
                    f"-c unix_socket_directories={workdir}",
                    "-c fsync=off",
                    "-c synchronous_commit=off",
                    "-c full_page_writes=off",
                    "-c max_connections=200",
                    "-c timezone=UTC",
                ]
            )
            try:
                # -w: pg_ctl itself polls until the server accepts connections or the
                # -t deadline passes; no sleeps here.
                runner.run(
                    "pg_ctl",
                    "-D",
                    str(data),
                    "-l",
                    str(workdir / "server.log"),
                    "-o",
                    options,
                    "-w",
                    "-t",
                    str(int(START_TIMEOUT_S)),
                    "start",
                    timeout=START_TIMEOUT_S + 10,
                )
                started = True
                break
            except RuntimeError:
                log_text = _read_log(workdir)
                if "Address already in use" in log_text and attempt + 1 < start_attempts:
                    continue  # the port was taken after we picked it: pick another
                raise RuntimeError(f"PostgreSQL did not start; its log:\n{log_text}") from None
        url = f"postgresql+psycopg://{SERVER_USER}:{password}@127.0.0.1:{port}/postgres"
        wait_for(lambda: _accepts_connections(url), 30.0, "PostgreSQL to accept TCP connections")
        yield url
    finally:
        if started:
            runner.run("pg_ctl", "-D", str(data), "-m", "fast", "-w", "stop")
        shutil.rmtree(workdir, ignore_errors=True)


def _read_log(workdir: Path) -> str:
    try:
        return (workdir / "server.log").read_text(errors="replace")
    except OSError:
        return "(no log)"


@contextlib.contextmanager
def fresh_database(server_url: str, prefix: str = "t") -> Iterator[str]:
    """An empty database on the server at `server_url` for the duration of the block;
    yields its URL. Dropped at the end, with any connections still open to it."""
    name = f"{prefix}_{uuid.uuid4().hex[:16]}"
    # CREATE/DROP DATABASE cannot run inside a transaction.
    admin = create_engine(server_url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        try:
            yield make_url(server_url).set(database=name).render_as_string(hide_password=False)
        finally:
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()
