"""Metrics in the Prometheus text format, served at `GET /metrics`.

Each part of fluxserve registers what it measures on the process's one
`Registry`: counters it raises as things happen, and gauges read at scrape time
(from the store, say), so a number that lives in the database is never cached
here. No client library: the format is a few lines of text.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")

Labels = tuple[tuple[str, str], ...]
GaugeReader = Callable[[], Awaitable[float | dict[tuple[str, ...], float]]]


class Counter:
    """A number that only goes up, per set of label values."""

    def __init__(self, name: str, help_text: str, labelnames: tuple[str, ...] = ()) -> None:
        self.name = name
        self.help = help_text
        self.labelnames = labelnames
        self._values: dict[Labels, float] = {}
        if not labelnames:
            self._values[()] = 0.0

    def declare(self, **labels: str) -> None:
        """Show this label set as 0 before it first counts, so rate() has a start."""
        self._values.setdefault(self._key(labels), 0.0)

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = self._key(labels)
        self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: str) -> float:
        return self._values.get(self._key(labels), 0.0)

    def _key(self, labels: dict[str, str]) -> Labels:
        if set(labels) != set(self.labelnames):
            raise ValueError(f"{self.name} takes the labels {self.labelnames}, got {tuple(labels)}")
        return tuple((name, labels[name]) for name in self.labelnames)

    def samples(self) -> list[tuple[Labels, float]]:
        return sorted(self._values.items())


class Registry:
    """The metrics of one process, in registration order."""

    def __init__(self) -> None:
        self._counters: list[Counter] = []
        self._gauges: list[tuple[str, str, tuple[str, ...], GaugeReader]] = []
        self._names: set[str] = set()

    def counter(self, name: str, help_text: str, labelnames: tuple[str, ...] = ()) -> Counter:
        """A new counter; `name` should end in `_total`, as Prometheus expects."""
        self._claim(name)
        counter = Counter(name, help_text, labelnames)
        self._counters.append(counter)
        return counter

    def gauge(
        self,
        name: str,
        help_text: str,
        read: GaugeReader,
        labelnames: tuple[str, ...] = (),
    ) -> None:
        """A gauge whose value `read` fetches at each scrape: a number, or with
        `labelnames` a number per tuple of label values."""
        self._claim(name)
        self._gauges.append((name, help_text, labelnames, read))

    async def render(self) -> str:
        """The exposition text: HELP, TYPE and samples of every metric."""
        lines: list[str] = []
        for counter in self._counters:
            lines += _header(counter.name, counter.help, "counter")
            lines += [_sample(counter.name, labels, v) for labels, v in counter.samples()]
        for name, help_text, labelnames, read in self._gauges:
            lines += _header(name, help_text, "gauge")
            value = await read()
            if isinstance(value, dict):
                lines += [
                    _sample(name, tuple(zip(labelnames, values, strict=True)), v)
                    for values, v in sorted(value.items())
                ]
            else:
                lines.append(_sample(name, (), value))
        return "\n".join(lines) + "\n"

    def _claim(self, name: str) -> None:
        if not _NAME.fullmatch(name) or name in self._names:
            raise ValueError(f"metric name {name!r} is invalid or already registered")
        self._names.add(name)


def _header(name: str, help_text: str, kind: str) -> list[str]:
    return [f"# HELP {name} {_escape(help_text, quote=False)}", f"# TYPE {name} {kind}"]


def _sample(name: str, labels: Labels, value: float) -> str:
    # Integral values print as integers: counts read best that way, and repr
    # keeps every digit of the rest (":g" would round a large counter).
    text = str(int(value)) if float(value).is_integer() else repr(float(value))
    if not labels:
        return f"{name} {text}"
    inner = ",".join(f'{key}="{_escape(val, quote=True)}"' for key, val in labels)
    return f"{name}{{{inner}}} {text}"


def _escape(text: str, *, quote: bool) -> str:
    text = text.replace("\\", "\\\\").replace("\n", "\\n")
    return text.replace('"', '\\"') if quote else text
