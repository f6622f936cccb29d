"""A CPU cap made of suspend/resume, for drivers without cputune (qemu:///session).

Every `period` the guest runs for `percent` of it and is suspended for the rest. Suspend
and resume cost ~1.3 ms each (measured on a TCG guest), so a 100 ms period keeps the
overhead near 3 % while the cap stays accurate over any window of a second or more.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


class DutyCycler:
    """Runs the suspend/resume cycle of one guest on its own thread.

    Start it only while the guest is running; it leaves the guest running when stopped.

    `suspend` and `resume` are called on that thread; `on_error` too, once, when either
    raises (the guest is gone, say), after which the thread ends.
    """

    def __init__(
        self,
        guest: str,
        suspend: Callable[[], None],
        resume: Callable[[], None],
        percent: float,
        *,
        period_s: float = 0.1,
        on_error: Callable[[Exception], None] | None = None,
    ) -> None:
        if not 0 < percent < 100:
            raise ValueError(f"cpu cap: {percent!r} must be between 0 and 100 (exclusive)")
        self.guest = guest
        self._suspend = suspend
        self._resume = resume
        self._percent = percent
        self._period = period_s
        self._on_error = on_error
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"duty-{guest}", daemon=True)

    @property
    def percent(self) -> float:
        return self._percent

    def set_percent(self, percent: float) -> None:
        if not 0 < percent < 100:
            raise ValueError(f"cpu cap: {percent!r} must be between 0 and 100 (exclusive)")
        self._percent = percent

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop cycling and wait for the thread; the guest is left running."""
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join()

    def _run(self) -> None:
        # The guest is running when the cycle starts: run first, then suspend.
        next_start = time.monotonic()
        try:
            while True:
                on_time = self._period * self._percent / 100
                if self._stop.wait(max(0.0, next_start + on_time - time.monotonic())):
                    return  # still running, as stop() promises
                self._suspend()
                next_start += self._period
                stopping = self._stop.wait(max(0.0, next_start - time.monotonic()))
                self._resume()
                if stopping:
                    return
        except Exception as exc:  # the guest vanished or libvirt failed: stop cycling
            log.warning("duty-cycle cap of %s stopped: %s", self.guest, exc)
            if self._on_error is not None:
                self._on_error(exc)
