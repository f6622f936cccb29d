"""Watch the tiny guest's counter across donors: when each tick appeared, on which host.

A guest that moves prints its ticks first into one donor's console file, then into the
other's. `TickWatcher` polls the files every millisecond or two on its own thread and
notes the host's monotonic time at which each new tick line appeared, so a test can
prove continuity (the counter never goes backwards, nothing is repeated) and measure
the guest-visible pause (the largest gap between consecutive ticks).
"""

from __future__ import annotations

import itertools
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

_TICK = re.compile(rb"^tick (\d+) ", re.MULTILINE)


@dataclass(frozen=True, slots=True)
class Tick:
    at: float  # time.monotonic() when it was seen
    value: int
    where: str  # which console file (its label)


class TickWatcher:
    def __init__(self, consoles: dict[str, Path], poll_s: float = 0.001) -> None:
        self._consoles = consoles
        # Per label: which file (device, inode) was being read, and how far. A guest dir
        # removed and made again (the guest left and came back) is a new file: read it
        # from its start; the old one, still there for a moment, is not read twice.
        self._files: dict[str, tuple[int, int]] = {}
        self._offsets = dict.fromkeys(consoles, 0)
        self._partial = dict.fromkeys(consoles, b"")
        self._poll_s = poll_s
        self._ticks: list[Tick] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tick-watcher", daemon=True)

    def __enter__(self) -> TickWatcher:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def watch(self, label: str, console: Path) -> None:
        """Follow one more console file (a donor the guest may go to)."""
        with self._lock:
            self._consoles[label] = console
            self._offsets.setdefault(label, 0)
            self._partial.setdefault(label, b"")

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                consoles = dict(self._consoles)
            for label, path in consoles.items():
                self._read(label, path)
            time.sleep(self._poll_s)

    def _read(self, label: str, path: Path) -> None:
        try:
            with path.open("rb") as f:
                stat = os.fstat(f.fileno())
                identity = (stat.st_dev, stat.st_ino)
                size = f.seek(0, 2)
                with self._lock:
                    if self._files.get(label) != identity:
                        self._files[label] = identity
                        self._offsets[label] = 0
                        self._partial[label] = b""
                    offset = self._offsets[label]
                if size < offset:  # truncated (or a new file that reused the inode)
                    offset = 0
                if size == offset:
                    return
                f.seek(offset)
                data = f.read(size - offset)
        except FileNotFoundError:
            return
        now = time.monotonic()
        with self._lock:
            self._offsets[label] = offset + len(data)
            buffer = self._partial[label] + data
            complete, _, rest = buffer.rpartition(b"\n")
            self._partial[label] = rest
            for match in _TICK.finditer(complete + b"\n"):
                self._ticks.append(Tick(now, int(match.group(1)), label))

    def ticks(self) -> list[Tick]:
        with self._lock:
            return list(self._ticks)

    def last(self) -> Tick | None:
        with self._lock:
            return self._ticks[-1] if self._ticks else None

    def latest_on(self, label: str) -> Tick | None:
        with self._lock:
            return next((t for t in reversed(self._ticks) if t.where == label), None)


def largest_gap_ms(ticks: list[Tick], since: float, until: float) -> float:
    """The longest time between consecutive new ticks seen within [since, until], the
    last tick before `since` included: a guest that stopped ticking just before the
    window opened (saved for a cold move) was already in its gap."""
    before = [t.at for t in ticks if t.at < since][-1:]
    window = before + [t.at for t in ticks if since <= t.at <= until]
    if len(window) < 2:
        return float("inf")
    return max(b - a for a, b in itertools.pairwise(window)) * 1000


def check_continuity(ticks: list[Tick]) -> None:
    """The counter never went backwards and no value was printed twice (a guest running
    in two places at once would print some values twice, in two files)."""
    values = [t.value for t in ticks]
    assert values == sorted(values), f"the counter went backwards: {_around_drop(ticks)}"
    assert len(values) == len(set(values)), "some ticks were printed twice (two copies ran)"


def _around_drop(ticks: list[Tick]) -> list[tuple[int, str]]:
    for i in range(1, len(ticks)):
        if ticks[i].value < ticks[i - 1].value:
            return [(t.value, t.where) for t in ticks[max(0, i - 3) : i + 3]]
    return []
