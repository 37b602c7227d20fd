"""A few Prometheus metric types and the text exposition format (version 0.0.4), without prometheus_client.

`Counter` and `Histogram` keep server-side state (thread-safe); values owned elsewhere (the engine's counters
and gauges) are rendered at scrape time with `render_family`.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable, Sequence

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

Labels = tuple[tuple[str, str], ...]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _fmt_value(v: float) -> str:
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if float(v).is_integer() and abs(v) < 2**53:
        return str(int(v))
    return repr(float(v))


def _fmt_labels(labels: Iterable[tuple[str, str]]) -> str:
    parts = [f'{k}="{_escape(str(v))}"' for k, v in labels]
    return "{" + ",".join(parts) + "}" if parts else ""


def render_family(name: str, kind: str, help_text: str, samples: Sequence[tuple[str, Labels, float]]) -> str:
    """One metric family: HELP and TYPE lines, then `name{labels} value` per sample.

    samples: (suffix, labels, value); the suffix ('' or '_bucket', '_sum', ...) is appended to `name`."""
    help_text = help_text.replace("\\", "\\\\").replace("\n", "\\n")
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
    lines += [f"{name}{suffix}{_fmt_labels(labels)} {_fmt_value(value)}" for suffix, labels, value in samples]
    return "\n".join(lines) + "\n"


class Counter:
    """A monotonically increasing count, optionally split by labels."""

    def __init__(self, name: str, help_text: str, labelnames: Sequence[str] = ()):
        self.name, self.help, self.labelnames = name, help_text, tuple(labelnames)
        self._values: dict[Labels, float] = {}
        self._lock = threading.Lock()

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        if amount < 0:
            raise ValueError(f"amount: a counter only goes up, got {amount}")
        if set(labels) != set(self.labelnames):
            raise ValueError(f"labels: expected {self.labelnames}, got {tuple(labels)}")
        key = tuple((k, str(labels[k])) for k in self.labelnames)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: str) -> float:
        key = tuple((k, str(labels[k])) for k in self.labelnames)
        with self._lock:
            return self._values.get(key, 0.0)

    def render(self) -> str:
        with self._lock:
            samples = [("", key, v) for key, v in sorted(self._values.items())]
        if not self.labelnames and not samples:
            samples = [("", (), 0.0)]
        return render_family(self.name, "counter", self.help, samples)


class Histogram:
    """Observations counted into cumulative `le` buckets, plus their sum and count."""

    def __init__(self, name: str, help_text: str, buckets: Sequence[float]):
        if list(buckets) != sorted(buckets) or not buckets:
            raise ValueError(f"buckets: expected a non-empty increasing sequence, got {buckets}")
        self.name, self.help = name, help_text
        self.buckets = tuple(float(b) for b in buckets)
        self._counts = [0] * (len(self.buckets) + 1)  # the last one is +Inf
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        i = next((k for k, b in enumerate(self.buckets) if value <= b), len(self.buckets))
        with self._lock:
            self._counts[i] += 1
            self._sum += value

    @property
    def count(self) -> int:
        with self._lock:
            return sum(self._counts)

    def render(self) -> str:
        with self._lock:
            counts, total = list(self._counts), self._sum
        samples: list[tuple[str, Labels, float]] = []
        running = 0
        for b, c in zip((*self.buckets, math.inf), counts):
            running += c
            samples.append(("_bucket", (("le", _fmt_value(b)),), running))
        samples += [("_sum", (), total), ("_count", (), running)]
        return render_family(self.name, "histogram", self.help, samples)
