"""Metric families rendered straight to the text format, byte for byte as prometheus_client does.

prometheus_client's ``generate_latest`` validates and escapes every label of every sample on
every pass: at 8 GPUs and a 1 s interval that was 70 % of the exporter's collection time.
Here a family keeps its samples as (label values, value) tuples, and a :class:`Renderer`
remembers the escaped ``name{label="value",...} `` prefix of each series it rendered in its
previous pass, so a steady series costs a dictionary lookup and the formatting of its value.
Only the series of the last pass are remembered, so the cache cannot grow with churn (exited
processes, replaced GPUs).

The output is what ``generate_latest`` writes for the same samples (tests compare the two), without
importing prometheus_client at all: the exporter's process does not load it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

_VALUES_KEPT = 4096  # formatted values remembered (0, 1, limits, sizes recur every pass)


class Family:
    """A gauge or counter family, the subset of prometheus_client's ``*MetricFamily`` the collectors use."""

    __slots__ = ("name", "documentation", "type", "labels", "samples")

    def __init__(self, name: str, documentation: str, labels: Sequence[str] = (), *, kind: str = "gauge") -> None:
        # like CounterMetricFamily: the family is named without _total, its samples with it
        self.name = name.removesuffix("_total") if kind == "counter" else name
        self.documentation = documentation
        self.type = kind
        self.labels = tuple(labels)
        self.samples: list[tuple[tuple[str, ...], float]] = []

    def add_metric(self, labels: Sequence[str], value: float) -> None:
        self.samples.append((labels if type(labels) is tuple else tuple(labels), value))


def gauge(name: str, documentation: str, labels: Sequence[str] = ()) -> Family:
    return Family(name, documentation, labels)


def counter(name: str, documentation: str, labels: Sequence[str] = ()) -> Family:
    return Family(name, documentation, labels, kind="counter")


class _Layout:
    """What never changes for a family: its header lines, sample name and label order."""

    __slots__ = ("header", "sample_name", "order", "labels")

    def __init__(self, family: Family) -> None:
        exposed = family.name + "_total" if family.type == "counter" else family.name
        help_text = family.documentation.replace("\\", r"\\").replace("\n", r"\n")
        self.header = f"# HELP {exposed} {help_text}\n# TYPE {exposed} {family.type}\n"
        self.sample_name = exposed
        self.labels = family.labels
        # prometheus_client writes labels sorted by name
        self.order = sorted(range(len(family.labels)), key=lambda i: family.labels[i])

    def prefix(self, values: tuple[str, ...]) -> str:
        """``name{label="value",...} `` for one series."""
        if not values:
            return self.sample_name + " "
        pairs = ",".join(f'{self.labels[i]}="{_escape(values[i])}"' for i in self.order)
        return f"{self.sample_name}{{{pairs}}} "


_layouts: dict[tuple[str, str, str, tuple[str, ...]], _Layout] = {}
_values: dict[float, str] = {}
_lines: dict[float, str] = {}  # value -> its text and the line's end, for the renderer
_NO_PREFIXES: dict[tuple[str, ...], str] = {}


def _layout(family: Family) -> _Layout:
    key = (family.name, family.type, family.documentation, family.labels)
    layout = _layouts.get(key)
    if layout is None:
        layout = _layouts[key] = _Layout(family)
    return layout


def _escape(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def format_value(value: float) -> str:
    """prometheus_client's ``floatToGoString``, remembered for values that recur."""
    text = _values.get(value)
    if text is not None:
        return text
    number = float(value)
    if number == math.inf:
        text = "+Inf"
    elif number == -math.inf:
        text = "-Inf"
    elif math.isnan(number):
        return "NaN"  # NaN != NaN: never found in the dictionary, so not kept
    else:
        text = repr(number)
        dot = text.find(".")
        if number > 0 and dot > 6:  # Go switches to exponents sooner than Python
            mantissa = f"{text[0]}.{text[1:dot]}{text[dot + 1:]}".rstrip("0.")
            text = f"{mantissa}e+{dot - 1:02d}"
    if len(_values) >= _VALUES_KEPT:
        _values.clear()
    _values[value] = text
    return text


def _line_end(value: float) -> str:
    """``format_value(value)`` and a newline, remembered like the value's text."""
    text = format_value(value) + "\n"
    if text != "NaN\n":
        if len(_lines) >= _VALUES_KEPT:
            _lines.clear()
        _lines[value] = text
    return text


class Renderer:
    """Renders one collector's families, pass after pass, reusing the label text of its series.

    The text is remembered per family by label values; a collector that hands the same label tuple
    every pass (the gpu and processes collectors do) makes the lookup an identity check.
    """

    def __init__(self) -> None:
        self._prefixes: dict[str, dict[tuple[str, ...], str]] = {}

    def render(self, families: Iterable[Family]) -> bytes:
        previous = self._prefixes
        current: dict[str, dict[tuple[str, ...], str]] = {}
        out: list[str] = []
        append = out.append
        lines = _lines
        for family in families:
            if not family.samples:
                continue
            layout = _layout(family)
            append(layout.header)
            before = previous.get(layout.sample_name, _NO_PREFIXES)
            now = current.setdefault(layout.sample_name, {})
            for values, value in family.samples:
                prefix = before.get(values) or now.get(values)
                if prefix is None:
                    prefix = layout.prefix(values)
                now[values] = prefix
                append(prefix + (lines.get(value) or _line_end(value)))
        self._prefixes = current
        return "".join(out).encode()


def to_prometheus_client(family: Family) -> Metric:
    """The same samples as one of prometheus_client's families (for the benchmark's naive baseline and the tests)."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    kind = CounterMetricFamily if family.type == "counter" else GaugeMetricFamily
    theirs = kind(family.name, family.documentation, labels=list(family.labels))
    for values, value in family.samples:
        theirs.add_metric(list(values), value)
    return theirs


def render(families: Iterable[Family]) -> bytes:
    """The exposition text of ``families`` (empty families left out), without a cache."""
    return Renderer().render(families)
