"""Logging for sensors that are polled: one line per outage, not one per poll."""

from __future__ import annotations

import logging


class FailureLog:
    """Logs a sensor's first failure and its recovery, and stays quiet in between.

    A polled sensor that fails once a second would otherwise flood the log. Not
    thread-safe: it belongs to one sensor, polled by one thread.
    """

    def __init__(self, logger: logging.Logger, sensor: str) -> None:
        self._logger = logger
        self._sensor = sensor
        self._failing = False

    @property
    def failing(self) -> bool:
        """Whether the last query failed."""
        return self._failing

    def failed(self, error: BaseException) -> None:
        """Record a failed query; log it if the previous query succeeded."""
        if not self._failing:
            self._failing = True
            self._logger.warning(
                "%s failed (logged once until it recovers): %s", self._sensor, error
            )

    def succeeded(self) -> None:
        """Record a successful query; log the recovery if the previous one failed."""
        if self._failing:
            self._failing = False
            self._logger.info("%s works again", self._sensor)
