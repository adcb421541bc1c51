"""Prometheus' text format, written fast: what ``GET /metrics`` sends.

prometheus_client's ``generate_latest`` took about 6 µs a sample, most of it re-checking the same
few label names on each of 13,000 samples; :func:`render` checks them once per label set. It
writes exactly what ``generate_latest`` writes (tests/service/test_exposition.py compares the two
byte for byte) and hands anything outside what :mod:`service.metrics` produces (other metric
types, timestamps, ``_created`` samples, unusual names) to ``generate_latest``.

Families are declared in :mod:`service.metrics`; this module only formats them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

_TYPES = {"counter", "gauge", "histogram"}
_LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
_METRIC_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")


class _Unusual(Exception):
    """A metric render() leaves to prometheus_client."""


class CounterTable(CounterMetricFamily):
    """A counter family kept as one flat list of label values and values.

    For the per-job and total series: CounterMetricFamily keeps a Sample with its own labels dict
    per series, and 13,000 of those cost about 11 ms a scrape and, held until the scrape ends,
    enough live objects to run Python's full garbage collection every few scrapes (45 ms each in
    the API process). Strings in one list are not tracked by the collector at all. render()
    writes the list straight out; ``samples`` is still there for any other reader of the
    registry, built when read.
    """

    def __init__(self, name: str, documentation: str, labels: Sequence[str]):
        self.flat: list[Any] = []  # label values..., value, label values..., value
        self.labelnames = tuple(labels)
        super().__init__(name, documentation, labels=labels)

    def rows(self) -> Iterator[tuple[list[Any], Any]]:
        width = len(self.labelnames) + 1
        flat = self.flat
        for at in range(0, len(flat), width):
            yield flat[at : at + width - 1], flat[at + width - 1]

    @property
    def samples(self) -> list[Sample]:
        name = self.name + "_total"
        return [
            Sample(name, dict(zip(self.labelnames, labels, strict=True)), value)
            for labels, value in self.rows()
        ]

    @samples.setter
    def samples(self, value: list[Sample]) -> None:
        if value:  # Metric.__init__ starts every family with []
            raise TypeError("add series to a CounterTable with add_metric")

    def add_metric(
        self,
        labels: Sequence[str],
        value: float,
        created: float | None = None,
        timestamp: Any = None,
        exemplar: Any = None,
    ) -> None:
        if len(labels) != len(self.labelnames):
            raise ValueError(f"{self.name}: {len(self.labelnames)} label values, got {labels!r}")
        if created is not None or timestamp is not None or exemplar is not None:
            raise TypeError("a CounterTable series is label values and a value only")
        self.flat.extend(labels)
        self.flat.append(value)


def _escape(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def _label_format(names: tuple[str, ...]) -> str:
    """A str.format template for one label set, in sorted name order as generate_latest has it."""
    if not all(_LABEL_NAME.match(n) for n in names):
        raise _Unusual(names)
    order = sorted(range(len(names)), key=lambda i: names[i])
    return ",".join(f'{names[i]}="{{{i}}}"' for i in order)


def _value(value: float) -> str:
    text = repr(float(value))
    if "n" in text or text.find(".") > 6:  # inf, nan, or where Go switches to an exponent
        return floatToGoString(value)
    return text


def _text(metrics: Iterable[Metric]) -> bytes:
    out: list[str] = []
    formats: dict[tuple[str, ...], str] = {}
    for metric in metrics:
        mtype = metric.type
        name = metric.name + "_total" if mtype == "counter" else metric.name
        if mtype not in _TYPES or not _METRIC_NAME.match(name):
            raise _Unusual(metric.name)
        doc = metric.documentation.replace("\\", r"\\").replace("\n", r"\n")
        out.append(f"# HELP {name} {doc}\n# TYPE {name} {mtype}\n")
        if isinstance(metric, CounterTable):
            fmt = _label_format(metric.labelnames)
            for values, value in metric.rows():
                joined = "".join(values)
                if "\\" in joined or "\n" in joined or '"' in joined:
                    values = [_escape(v) for v in values]
                out.append(f"{name}{{{fmt.format(*values)}}} {_value(value)}\n")
            continue
        for s in metric.samples:
            if s.timestamp is not None or s.name.endswith(("_created", "_gsum", "_gcount")):
                raise _Unusual(s.name)
            if not s.labels:
                out.append(f"{s.name} {_value(s.value)}\n")
                continue
            names = tuple(s.labels)
            fmt = formats.get(names) or formats.setdefault(names, _label_format(names))
            values = list(s.labels.values())
            joined = "".join(values)
            if "\\" in joined or "\n" in joined or '"' in joined:
                values = [_escape(v) for v in values]
            out.append(f"{s.name}{{{fmt.format(*values)}}} {_value(s.value)}\n")
    return "".join(out).encode()


def render(reg: CollectorRegistry) -> tuple[bytes, str]:
    """The registry in Prometheus' text format, and its content type."""
    families = list(reg.collect())
    try:
        return _text(families), CONTENT_TYPE_LATEST
    except _Unusual:
        return generate_latest(_Families(families)), CONTENT_TYPE_LATEST


class _Families:
    """Already collected families, for generate_latest (which wants a collector)."""

    def __init__(self, families: list[Metric]):
        self.families = families

    def collect(self) -> list[Metric]:
        return self.families
