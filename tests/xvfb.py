"""A private Xvfb X server for tests: `with running_xvfb() as display: ...`.

A plain module (not a conftest) so GUI and e2e tests can share it. It raises when Xvfb
is missing (FileNotFoundError): CI installs it, so a missing server is a failure.

Readiness comes from Xvfb itself (`-displayfd` writes the display number once it
accepts connections), then the socket is checked. Display numbers start at 90; a number
another server holds makes Xvfb exit at once and the next one is tried, so parallel
test runs do not collide.
"""

from __future__ import annotations

import contextlib
import os
import select
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

X11_SOCKET_DIR = Path("/tmp/.X11-unix")


def _taken(number: int) -> bool:
    return Path(f"/tmp/.X{number}-lock").exists() or (X11_SOCKET_DIR / f"X{number}").exists()


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


def _read_stderr(stderr: IO[bytes]) -> str:
    stderr.seek(0)
    return stderr.read().decode(errors="replace").strip()


def _wait_until_ready(
    process: subprocess.Popen[bytes], ready_fd: int, number: int, deadline: float
) -> bool:
    """True once Xvfb reported `number` and its socket exists; False if it exited."""
    received = b""
    while not received.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"Xvfb :{number} not ready in time")
        readable, _, _ = select.select([ready_fd], [], [], min(remaining, 0.1))
        if readable:
            chunk = os.read(ready_fd, 64)
            if not chunk:  # Xvfb exited (closed its end): e.g. the display was taken
                return False
            received += chunk
        elif process.poll() is not None:
            return False
    if received.strip() != str(number).encode():
        raise RuntimeError(f"Xvfb reported display {received!r}, expected {number}")
    socket = X11_SOCKET_DIR / f"X{number}"
    while not socket.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"Xvfb :{number} reported ready but {socket} is missing")
        if process.poll() is not None:
            return False
        time.sleep(0.01)  # polling a condition under a deadline, not a fixed wait
    return True


@contextlib.contextmanager
def running_xvfb(
    *,
    first_display: int = 90,
    attempts: int = 50,
    timeout_s: float = 60.0,
    screen: str = "1280x800x24",
) -> Iterator[str]:
    """Start Xvfb on a free display, yield its name (e.g. ":90"), stop it on exit.

    The caller sets DISPLAY (e.g. with `monkeypatch.setenv`) for what it runs.
    """
    deadline = time.monotonic() + timeout_s
    with tempfile.TemporaryFile() as stderr:
        for number in range(first_display, first_display + attempts):
            if _taken(number):
                continue
            ready_read, ready_write = os.pipe()
            try:
                process = subprocess.Popen(
                    [
                        "Xvfb",
                        f":{number}",
                        "-displayfd",
                        str(ready_write),
                        "-nolisten",
                        "tcp",
                        # Without -noreset the server resets whenever its last client
                        # disconnects, which races with the next test's connection.
                        "-noreset",
                        "-screen",
                        "0",
                        screen,
                    ],
                    pass_fds=(ready_write,),
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=stderr,
                )
            finally:
                os.close(ready_write)
            try:
                ready = _wait_until_ready(process, ready_read, number, deadline)
            except BaseException:
                _stop(process)
                raise
            finally:
                os.close(ready_read)
            if ready:
                break
            _stop(process)  # display taken meanwhile: try the next number
        else:
            raise RuntimeError(f"no free X display in :{first_display}..: {_read_stderr(stderr)}")
        try:
            yield f":{number}"
        finally:
            _stop(process)
