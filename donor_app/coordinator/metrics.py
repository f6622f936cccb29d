"""Prometheus metrics: donors connected, workloads by state, RPC and event latency.

A private registry (not prometheus_client's global one) so tests and several
coordinators in one process do not collide. Gauges are read from the fleet when
scraped, never kept in step by hand.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0)


class _FleetCollector(Collector):
    def __init__(
        self, connected: Callable[[], int], workloads: Callable[[], Mapping[str, int]]
    ) -> None:
        self._connected = connected
        self._workloads = workloads

    def collect(self) -> Iterator[Metric]:
        donors = GaugeMetricFamily(
            "donor_coordinator_donors_connected", "Donors with an open Connect stream"
        )
        donors.add_metric([], self._connected())
        yield donors
        workloads = GaugeMetricFamily(
            "donor_coordinator_workloads", "Workloads by state", labels=["state"]
        )
        for state, count in sorted(self._workloads().items()):
            workloads.add_metric([state], count)
        yield workloads


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.rpc_seconds = Histogram(
            "donor_coordinator_rpc_seconds",
            "Time to answer a unary RPC",
            ["method"],
            registry=self.registry,
            buckets=_LATENCY_BUCKETS,
        )
        self.event_seconds = Histogram(
            "donor_coordinator_donor_event_seconds",
            "Time to handle one event on a donor's Connect stream",
            ["kind"],
            registry=self.registry,
            buckets=_LATENCY_BUCKETS,
        )
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def watch_fleet(
        self, connected: Callable[[], int], workloads: Callable[[], Mapping[str, int]]
    ) -> None:
        self.registry.register(_FleetCollector(connected, workloads))

    def serve(self, host: str, port: int) -> int:
        """Serve /metrics over HTTP on a thread; returns the bound port (port 0 picks)."""
        self._server, self._thread = start_http_server(port, host, registry=self.registry)
        return int(self._server.server_port)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
