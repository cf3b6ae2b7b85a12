"""The process's metrics on prometheus-client, served at `GET /metrics`.

Each part of fluxserve makes what it measures on the process's one `Metrics`:
counters and histograms it moves as things happen, and gauges read from the
database at each scrape, so a number that lives there is never cached here.
Prometheus's collectors are synchronous and the store is not, so a scrape first
awaits those reads, then renders their values beside everything else.

Several processes (API processes sharing a port, an API and a worker on one
machine) add up their counters and histograms with prometheus-client's
multiprocess mode: with `PROMETHEUS_MULTIPROC_DIR` set before a process starts,
each writes its values to files in that folder, and a scrape of any of them
reads them all.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Iterable, Sequence

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    start_http_server,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

MULTIPROCESS_DIR = "PROMETHEUS_MULTIPROC_DIR"

# The `_created` series double every counter's and histogram's series, and
# multiprocess mode has none: without them a scrape reads the same either way.
disable_created_metrics()

GaugeReader = Callable[[], Awaitable[float | dict[tuple[str, ...], float]]]


class Metrics:
    """The metrics of one process: what it counts and times, and the database gauges."""

    def __init__(self) -> None:
        self._registry = CollectorRegistry()
        self._gauges: list[_DatabaseGauge] = []

    def counter(self, name: str, help_text: str, labelnames: Sequence[str] = ()) -> Counter:
        """A new counter; `name` ends in `_total`, as Prometheus expects."""
        return Counter(name, help_text, labelnames, registry=self._registry)

    def histogram(
        self,
        name: str,
        help_text: str,
        labelnames: Sequence[str],
        buckets: Sequence[float],
    ) -> Histogram:
        """A new histogram; `name` ends in its unit, `_seconds`."""
        return Histogram(name, help_text, labelnames, registry=self._registry, buckets=buckets)

    def gauge(
        self,
        name: str,
        help_text: str,
        read: GaugeReader,
        labelnames: tuple[str, ...] = (),
    ) -> None:
        """A gauge whose value `read` fetches at each scrape: a number, or with
        `labelnames` a number per tuple of label values."""
        if any(gauge.name == name for gauge in self._gauges):
            raise ValueError(f"gauge {name!r} is already registered")
        self._gauges.append(_DatabaseGauge(name, help_text, labelnames, read))

    async def render(self, accept: str | None) -> tuple[bytes, str]:
        """The exposition in the format `accept` asks for (the plain text by
        default), and its content type."""
        encode, content_type = choose_encoder(accept or "")
        scrape = CollectorRegistry()
        scrape.register(self.counted())
        scrape.register(_Read([await gauge.read() for gauge in self._gauges]))
        return encode(scrape), content_type

    def counted(self) -> Collector:
        """The counters and histograms, without the database gauges: this
        process's, or in multiprocess mode every process's."""
        if os.environ.get(MULTIPROCESS_DIR):
            return MultiProcessCollector(None)
        return self._registry

    def serve(self, host: str, port: int) -> Callable[[], None]:
        """Serve `counted` at http://host:port/metrics from a thread, for a
        process without the API (a worker); returns what stops it."""
        server, thread = start_http_server(port, host, registry=self.counted())

        def stop() -> None:
            server.shutdown()
            thread.join()

        return stop


class _DatabaseGauge:
    def __init__(
        self, name: str, help_text: str, labelnames: tuple[str, ...], read: GaugeReader
    ) -> None:
        self.name = name
        self.help = help_text
        self.labelnames = labelnames
        self._read = read

    async def read(self) -> GaugeMetricFamily:
        value = await self._read()
        if not isinstance(value, dict):
            return GaugeMetricFamily(self.name, self.help, value=value)
        family = GaugeMetricFamily(self.name, self.help, labels=self.labelnames)
        for labels, number in sorted(value.items()):
            family.add_metric(labels, number)
        return family


class _Read(Collector):
    """Gauges already read for one scrape, as a collector."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self._families = list(families)

    def collect(self) -> Iterable[Metric]:
        return self._families
