"""Generate mlwarden's Grafana dashboards (dashboards/*.json) from one place.

The JSON is committed, so Grafana users import it without running Python; this file is
the source. Run ``.venv/bin/python -m dashboards.generate`` after editing it;
tests/test_dashboards.py fails while the committed JSON is stale, and runs every query
below against a real Prometheus holding the project's own metrics.

Every panel reads from the ``datasource`` template variable (no hard-coded datasource
uid), so the files import into any Grafana with a Prometheus datasource.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SCHEMA_VERSION = 39  # Grafana 10/11; older Grafanas migrate on import
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
WIDTH = 24  # Grafana's grid is 24 columns wide

Json = dict[str, Any]

def steps(*pairs: tuple[str, float]) -> Json:
    """Absolute thresholds: green below the first pair's value, then each (colour, from value)."""
    return {"mode": "absolute",
            "steps": [{"color": "green", "value": None}] + [{"color": c, "value": v} for c, v in pairs]}


def mapping(values: dict[str, tuple[str, str]]) -> list[Json]:
    """Value mappings: {"1": ("OK", "green"), ...}."""
    return [
        {
            "type": "value",
            "options": {value: {"text": text, "color": color, "index": i} for i, (value, (text, color)) in enumerate(values.items())},
        }
    ]


OK_FAILED = mapping({"1": ("OK", "green"), "0": ("FAILED", "red")})
UP_DOWN = mapping({"1": ("up", "green"), "0": ("DOWN", "red")})


@dataclass
class Target:
    expr: str
    legend: str = ""
    instant: bool = False
    table: bool = False

    def render(self, ref_id: str) -> Json:
        target: Json = {
            "datasource": DATASOURCE,
            "expr": self.expr,
            "refId": ref_id,
            "legendFormat": self.legend or "__auto",
            "range": not self.instant,
            "instant": self.instant,
        }
        if self.table:
            target["format"] = "table"
        return target


@dataclass
class Panel:
    title: str
    kind: str  # timeseries | stat | table | bargauge | state-timeline
    targets: list[Target]
    unit: str = "short"
    width: int = 8
    height: int = 8
    description: str = ""
    thresholds: Json = field(default_factory=lambda: steps())
    mappings: list[Json] = field(default_factory=list)
    minimum: float | None = None
    maximum: float | None = None
    options: Json = field(default_factory=dict)
    custom: Json = field(default_factory=dict)
    overrides: list[Json] = field(default_factory=list)
    transformations: list[Json] = field(default_factory=list)

    def render(self, panel_id: int, x: int, y: int) -> Json:
        defaults: Json = {"unit": self.unit, "thresholds": self.thresholds, "mappings": self.mappings}
        if self.kind in ("timeseries", "state-timeline"):
            defaults["color"] = {"mode": "palette-classic" if self.kind == "timeseries" else "thresholds"}
        else:
            defaults["color"] = {"mode": "thresholds"}
        if self.minimum is not None:
            defaults["min"] = self.minimum
        if self.maximum is not None:
            defaults["max"] = self.maximum
        if self.custom:
            defaults["custom"] = self.custom
        panel: Json = {
            "id": panel_id,
            "type": self.kind,
            "title": self.title,
            "description": self.description,
            "datasource": DATASOURCE,
            "gridPos": {"x": x, "y": y, "w": self.width, "h": self.height},
            "fieldConfig": {"defaults": defaults, "overrides": self.overrides},
            "options": self.options,
            "targets": [t.render(chr(ord("A") + i)) for i, t in enumerate(self.targets)],
        }
        if self.transformations:
            panel["transformations"] = self.transformations
        return panel


@dataclass
class Row:
    title: str
    panels: list[Panel]


# Panel shapes -----------------------------------------------------------------------------

def timeseries(title: str, *targets: Target, unit: str = "short", thresholds: Json | None = None,
               show_thresholds: bool = False, **kw: Any) -> Panel:
    custom: Json = {"lineWidth": 1, "fillOpacity": 10, "showPoints": "never", "spanNulls": False}
    if show_thresholds:
        custom["thresholdsStyle"] = {"mode": "line+area"}
    options = {"legend": {"displayMode": "table", "placement": "bottom", "calcs": ["lastNotNull", "max"]},
               "tooltip": {"mode": "multi", "sort": "desc"}}
    return Panel(title, "timeseries", list(targets), unit=unit, thresholds=thresholds or steps(),
                 custom=custom, options=options, **kw)


def stat(title: str, *targets: Target, unit: str = "short", text_mode: str = "value", **kw: Any) -> Panel:
    options = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
               "colorMode": "background", "graphMode": "none", "textMode": text_mode, "justifyMode": "auto"}
    kw.setdefault("width", 4)
    kw.setdefault("height", 4)
    return Panel(title, "stat", list(targets), unit=unit, options=options, **kw)


def bargauge(title: str, *targets: Target, unit: str = "short", **kw: Any) -> Panel:
    options = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
               "orientation": "horizontal", "displayMode": "gradient", "showUnfilled": True}
    return Panel(title, "bargauge", list(targets), unit=unit, options=options, **kw)


def state_timeline(title: str, *targets: Target, **kw: Any) -> Panel:
    options = {"showValue": "never", "mergeValues": True, "rowHeight": 0.8, "alignValue": "left",
               "legend": {"displayMode": "list", "placement": "bottom", "showLegend": False}}
    return Panel(title, "state-timeline", list(targets), custom={"fillOpacity": 80, "lineWidth": 0},
                 options=options, **kw)


def table(title: str, *targets: Target, columns: dict[str, str], hide: tuple[str, ...] = (),
          units: dict[str, str] | None = None, **kw: Any) -> Panel:
    """An instant table: one query per value column, merged on their labels.

    ``columns`` renames each target's value ("Value #A" -> a title), in order.
    """
    for target in targets:
        target.instant, target.table = True, True
    renames = {f"Value #{chr(ord('A') + i)}" if len(targets) > 1 else "Value": name
               for i, name in enumerate(columns.values())}
    excluded = {"Time": True, "__name__": True, "job": True, **{name: True for name in hide}}
    # A column renamed to one of ``hide`` (an info metric's constant 1) is hidden too.
    excluded.update({value: True for value, name in renames.items() if name in hide})
    transformations = []
    if len(targets) > 1:
        transformations.append({"id": "merge", "options": {}})
    transformations.append({"id": "organize", "options": {"excludeByName": excluded, "renameByName": renames}})
    overrides = [
        {"matcher": {"id": "byName", "options": column}, "properties": [{"id": "unit", "value": unit}]}
        for column, unit in (units or {}).items()
    ]
    kw.setdefault("width", 24)
    options = {"showHeader": True, "cellHeight": "sm", "footer": {"show": False, "reducer": ["sum"], "fields": ""}}
    return Panel(title, "table", list(targets), options=options, overrides=kw.pop("overrides", []) + overrides,
                 transformations=transformations, **kw)


def by_name_color(colors: dict[str, str]) -> list[Json]:
    return [
        {"matcher": {"id": "byName", "options": name},
         "properties": [{"id": "color", "value": {"mode": "fixed", "fixedColor": color}}]}
        for name, color in colors.items()
    ]


def dashed(regex: str) -> Json:
    return {"matcher": {"id": "byRegexp", "options": regex},
            "properties": [{"id": "custom.lineStyle", "value": {"fill": "dash", "dash": [10, 10]}},
                           {"id": "custom.fillOpacity", "value": 0}]}


# Dashboard assembly -----------------------------------------------------------------------

def datasource_variable() -> Json:
    return {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
            "current": {}, "hide": 0, "refresh": 1, "regex": "", "options": []}


def query_variable(name: str, label: str, query: str) -> Json:
    """A multi-value variable over label values, defaulting to All (regex ``.*``)."""
    return {
        "name": name, "label": label, "type": "query", "datasource": DATASOURCE,
        "query": {"query": query, "refId": f"{name}-values"}, "definition": query,
        "refresh": 2, "multi": True, "includeAll": True, "allValue": ".*",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "sort": 3, "hide": 0, "options": [], "regex": "",
    }


def dashboard(uid: str, title: str, description: str, variables: list[Json], rows: list[Row]) -> Json:
    panels: list[Json] = []
    next_id, y = 1, 0
    for row in rows:
        panels.append({"id": next_id, "type": "row", "title": row.title, "collapsed": False,
                       "gridPos": {"x": 0, "y": y, "w": WIDTH, "h": 1}, "panels": []})
        next_id, y = next_id + 1, y + 1
        x, line_height = 0, 0
        for panel in row.panels:
            if x + panel.width > WIDTH:
                x, y, line_height = 0, y + line_height, 0
            panels.append(panel.render(next_id, x, y))
            next_id += 1
            x += panel.width
            line_height = max(line_height, panel.height)
        y += line_height
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": ["mlwarden"],
        "editable": True,
        "graphTooltip": 1,
        "refresh": "30s",
        "schemaVersion": SCHEMA_VERSION,
        "version": 1,
        "time": {"from": "now-6h", "to": "now"},
        "timepicker": {},
        "timezone": "",
        "annotations": {"list": [{
            "builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"}, "enable": True, "hide": True,
            "iconColor": "rgba(0, 211, 255, 1)", "name": "Annotations & Alerts", "type": "dashboard",
        }]},
        "links": [{"title": "mlwarden dashboards", "type": "dashboards", "tags": ["mlwarden"], "asDropdown": True}],
        "templating": {"list": [datasource_variable(), *variables]},
        "panels": panels,
    }


# GPU fleet ----------------------------------------------------------------------------------

# Panels select the exporter by its metrics and the `job` variable (the scrape jobs that serve
# mlwarden_exporter_build_info), never by a job name: systemd and Kubernetes set-ups differ.
EXPORTER_JOB_VARIABLE = ("job", "Exporter job", "label_values(mlwarden_exporter_build_info, job)")
GPU = 'job=~"$job", instance=~"$instance", gpu=~"$gpu"'
GPU_EXPORTER = 'job=~"$job", instance=~"$instance"'
GPU_LEGEND = "{{instance}} GPU {{gpu}}"
TEMPERATURE = steps(("orange", 75), ("red", 85))  # the GpuTemperatureHigh / Critical thresholds
GPU_KEY = "on (instance, gpu, uuid)"
# SM activity (GPM) where a GPU has it, NVML utilization only where it has not: GpuAllocatedButIdle's measure.
ACTIVITY = (f"(mlwarden_gpu_sm_activity_ratio{{{GPU}}} or (mlwarden_gpu_utilization_ratio{{{GPU}}} "
            f"unless {GPU_KEY} mlwarden_gpu_sm_activity_ratio{{{GPU}}}))")
IDLE_BELOW = 0.05  # GpuAllocatedButIdle's threshold
# 1 for each workload on an idle GPU, 0 on a busy one.
IDLE_ALLOCATED = f"(mlwarden_gpu_allocation_info{{{GPU}}} * {GPU_KEY} group_left () ({ACTIVITY} < bool {IDLE_BELOW}))"
# Sampled once per Grafana interval over the range: samples x interval = idle time, in hours.
IDLE_HOURS = f"sum_over_time({IDLE_ALLOCATED}[$__range:$__interval]) * $__interval_ms / 3600000"


def idle_hours_by(label: str) -> str:
    return f"sort_desc(sum by ({label}) ({IDLE_HOURS}))"


def per_workload(expr: str) -> str:
    return f"mlwarden_gpu_allocation_info{{{GPU}}} * {GPU_KEY} group_left () {expr}"


def gpu_fleet() -> Json:
    fleet = Row("Fleet", [
        stat("GPUs up", Target(f"count(mlwarden_gpu_up{{{GPU}}} == 1) or vector(0)"),
             thresholds={"mode": "absolute", "steps": [{"color": "blue", "value": None}]}),
        stat("GPUs lost", Target(f"count(mlwarden_gpu_up{{{GPU}}} == 0) or vector(0)"), thresholds=steps(("red", 1)),
             description="GPUs NVML cannot read (fallen off the bus, driver trouble): the GpuLost alert."),
        stat("Hottest GPU", Target(f"max(mlwarden_gpu_temperature_celsius{{{GPU}}})"), unit="celsius",
             thresholds=TEMPERATURE),
        stat("Fleet utilization", Target(f"avg(mlwarden_gpu_utilization_ratio{{{GPU}}})"), unit="percentunit",
             thresholds=steps(), minimum=0, maximum=1),
        stat("Fleet power", Target(f"sum(mlwarden_gpu_power_watts{{{GPU}}})"), unit="watt",
             thresholds={"mode": "absolute", "steps": [{"color": "blue", "value": None}]}),
        stat("Firing GPU alerts",
             Target('count(ALERTS{alertstate="firing", alertname=~"Gpu.*", instance=~"$instance"}) or vector(0)'),
             thresholds=steps(("orange", 1))),
        table(
            "Fleet",
            Target(f"mlwarden_gpu_info{{{GPU}}}"),
            Target(f"mlwarden_gpu_temperature_celsius{{{GPU}}}"),
            Target(f"mlwarden_gpu_utilization_ratio{{{GPU}}}"),
            Target(f"mlwarden_gpu_memory_used_bytes{{{GPU}}} / mlwarden_gpu_memory_total_bytes{{{GPU}}}"),
            Target(f"mlwarden_gpu_power_watts{{{GPU}}}"),
            Target(f"mlwarden_gpu_power_limit_watts{{{GPU}}}"),
            Target(f"mlwarden_gpu_performance_state{{{GPU}}}"),
            Target(f"mlwarden_gpu_pcie_link_generation{{{GPU}}}"),
            Target(f"mlwarden_gpu_pcie_link_width{{{GPU}}}"),
            Target(f"mlwarden_gpu_up{{{GPU}}}"),
            columns={"info": "info", "temp": "Temperature", "util": "Utilization", "mem": "Memory used",
                     "power": "Power", "limit": "Power limit", "pstate": "P-state", "gen": "PCIe gen",
                     "width": "PCIe width", "up": "State"},
            hide=("info", "pci_bus_id"),
            units={"Temperature": "celsius", "Utilization": "percentunit", "Memory used": "percentunit",
                   "Power": "watt", "Power limit": "watt"},
            overrides=[{"matcher": {"id": "byName", "options": "State"},
                        "properties": [{"id": "mappings", "value": UP_DOWN},
                                       {"id": "custom.cellOptions", "value": {"type": "color-background"}}]},
                       {"matcher": {"id": "byName", "options": "Temperature"},
                        "properties": [{"id": "thresholds", "value": TEMPERATURE},
                                       {"id": "custom.cellOptions", "value": {"type": "color-background"}}]}],
            height=8,
            description="One row per GPU.",
        ),
    ])

    heat_power = Row("Temperature and power", [
        timeseries("GPU temperature", Target(f"mlwarden_gpu_temperature_celsius{{{GPU}}}", GPU_LEGEND),
                   unit="celsius", thresholds=TEMPERATURE, show_thresholds=True,
                   description="Warning above 75 C for 5 min, critical above 85 C for 2 min (alerts/rules/gpu.yml)."),
        timeseries("Memory temperature", Target(f"mlwarden_gpu_memory_temperature_celsius{{{GPU}}}", GPU_LEGEND),
                   unit="celsius", thresholds=steps(("orange", 85), ("red", 95))),
        timeseries("Power against the enforced limit",
                   Target(f"mlwarden_gpu_power_watts{{{GPU}}}", GPU_LEGEND),
                   Target(f"mlwarden_gpu_power_limit_watts{{{GPU}}}", GPU_LEGEND + " limit"),
                   unit="watt", overrides=[dashed(".* limit$")]),
        timeseries("Power as a share of the limit",
                   Target(f"mlwarden_gpu_power_watts{{{GPU}}} / mlwarden_gpu_power_limit_watts{{{GPU}}}", GPU_LEGEND),
                   unit="percentunit", minimum=0, thresholds=steps(("orange", 0.97)), show_thresholds=True),
        timeseries("Energy use (average power)",
                   Target(f"rate(mlwarden_gpu_energy_joules_total{{{GPU}}}[$__rate_interval])", GPU_LEGEND),
                   unit="watt"),
        timeseries("Fan speed", Target(f"mlwarden_gpu_fan_speed_ratio{{{GPU}}}", GPU_LEGEND),
                   unit="percentunit", minimum=0, maximum=1),
    ])

    load = Row("Utilization and memory", [
        timeseries("GPU utilization", Target(f"mlwarden_gpu_utilization_ratio{{{GPU}}}", GPU_LEGEND),
                   unit="percentunit", minimum=0, maximum=1),
        timeseries("Memory controller utilization",
                   Target(f"mlwarden_gpu_memory_utilization_ratio{{{GPU}}}", GPU_LEGEND),
                   unit="percentunit", minimum=0, maximum=1),
        timeseries("Memory used",
                   Target(f"mlwarden_gpu_memory_used_bytes{{{GPU}}} / mlwarden_gpu_memory_total_bytes{{{GPU}}}",
                          GPU_LEGEND),
                   unit="percentunit", minimum=0, maximum=1, thresholds=steps(("red", 0.95)), show_thresholds=True),
        timeseries("Memory used (bytes)",
                   Target(f"mlwarden_gpu_memory_used_bytes{{{GPU}}}", GPU_LEGEND),
                   Target(f"mlwarden_gpu_memory_total_bytes{{{GPU}}}", GPU_LEGEND + " total"),
                   unit="bytes", overrides=[dashed(".* total$")]),
        timeseries("Clocks", Target(f"mlwarden_gpu_clock_hz{{{GPU}}}", GPU_LEGEND + " {{clock}}"), unit="hertz"),
        timeseries("Processes per GPU", Target(f"mlwarden_gpu_processes{{{GPU}}}", GPU_LEGEND), unit="short",
                   minimum=0),
    ])

    throttle_mapping = mapping({"0": ("", "transparent"), "1": ("active", "orange")})
    errors = Row("Throttling and errors", [
        state_timeline(
            "Throttle reasons",
            Target(f'mlwarden_gpu_throttle_reason_active{{{GPU}, reason!~"gpu_idle|display_clock_setting"}}',
                   GPU_LEGEND + " {{reason}}"),
            mappings=throttle_mapping, width=12, height=10,
            description="Why clocks are held down. Thermal and hardware slowdowns alert (GpuThermalThrottling, "
                        "GpuPowerBrakeSlowdown); sw_power_cap under full load is normal.",
        ),
        state_timeline("GPU on the bus", Target(f"mlwarden_gpu_up{{{GPU}}}", GPU_LEGEND), mappings=UP_DOWN,
                       thresholds=steps(), width=12, height=10),
        timeseries("ECC errors since driver load",
                   Target(f'mlwarden_gpu_ecc_errors_total{{{GPU}, counter="volatile"}}', GPU_LEGEND + " {{error_type}}"),
                   unit="short", thresholds=steps(("red", 1)),
                   description="Any uncorrected error is critical (GpuUncorrectedEccErrors); more than 10 corrected "
                               "an hour warns."),
        table("Retired pages", Target(f"mlwarden_gpu_retired_pages{{{GPU}}}"), columns={"pages": "Pages"},
              hide=("uuid",), width=8, height=8,
              description="Memory pages the driver retired after ECC errors (older GPUs)."),
        table("Remapped rows", Target(f"mlwarden_gpu_remapped_rows{{{GPU}}}"), columns={"rows": "Rows"},
              hide=("uuid",), width=8, height=8,
              description="Row remapping (A100 and newer): a `failure` or many `pending` rows mean a reset or RMA."),
        timeseries("XID events",
                   Target(f"sum by (instance, gpu, xid) (increase(mlwarden_gpu_xid_errors_total{{{GPU}}}[$__rate_interval]))",
                          GPU_LEGEND + " XID {{xid}}"),
                   unit="short"),
        table("XID errors (counts since the exporter started)",
              Target(f"mlwarden_gpu_xid_errors_total{{{GPU}}}"),
              Target(f"mlwarden_gpu_xid_last_timestamp_seconds{{{GPU}}} * 1000"),
              columns={"count": "Count", "last": "Last seen"}, units={"Last seen": "dateTimeAsIso"}, width=16, height=8,
              description="XIDs 48, 62, 64, 74, 79, 94, 95, 119 and 120 page (GpuXidCriticalError)."),
    ])

    processes = Row("Processes", [
        table("Top processes by GPU memory",
              Target(f"topk(20, mlwarden_gpu_process_memory_used_bytes{{{GPU}}})"),
              columns={"mem": "GPU memory"}, units={"GPU memory": "bytes"}, hide=("uuid",), height=10),
    ])

    profiling = Row("Profiling and interconnect", [
        timeseries("SM activity (GPM)", Target(f"mlwarden_gpu_sm_activity_ratio{{{GPU}}}", GPU_LEGEND),
                   unit="percentunit", minimum=0, maximum=1,
                   description="Share of SMs busy over each collection interval (Hopper and later). Unlike utilization, "
                               "one tiny kernel in a loop does not read 100 %."),
        timeseries("Tensor core activity (GPM)", Target(f"mlwarden_gpu_tensor_activity_ratio{{{GPU}}}", GPU_LEGEND),
                   unit="percentunit", minimum=0, maximum=1),
        timeseries("DRAM bandwidth used (GPM)",
                   Target(f"mlwarden_gpu_dram_bandwidth_utilization_ratio{{{GPU}}}", GPU_LEGEND),
                   unit="percentunit", minimum=0, maximum=1),
        timeseries("PCIe throughput",
                   Target(f"mlwarden_gpu_pcie_throughput_bytes_per_second{{{GPU}}}", GPU_LEGEND + " {{direction}}"),
                   unit="Bps"),
        timeseries("Clock violation time (share of time throttled)",
                   Target(f"rate(mlwarden_gpu_clock_violation_seconds_total{{{GPU}}}[$__rate_interval]) > 0",
                          GPU_LEGEND + " {{reason}}"),
                   unit="percentunit", minimum=0,
                   description="How much of the time the clocks were held below target, by reason; only non-zero "
                               "reasons are drawn."),
        timeseries("SM occupancy (GPM)", Target(f"mlwarden_gpu_sm_occupancy_ratio{{{GPU}}}", GPU_LEGEND),
                   unit="percentunit", minimum=0, maximum=1),
    ])

    waste = Row("Waste: allocated but idle GPUs", [
        stat("Workloads on idle GPUs now", Target(f"sum({IDLE_ALLOCATED}) or vector(0)"),
             thresholds=steps(("orange", 1)), width=6,
             description=f"Workloads holding a GPU whose SM activity (or utilization, without GPM) is under "
                         f"{IDLE_BELOW:.0%}. GpuAllocatedButIdle fires after 30 minutes with over 1 GiB held."),
        bargauge("Idle GPU-hours by namespace", Target(idle_hours_by("namespace"), "{{namespace}}", instant=True), unit="h",
                 width=6, description="Over the dashboard's time range; Slurm and bare-metal work shows as an "
                                      "empty namespace. A GPU shared by several workloads counts for each."),
        bargauge("Idle GPU-hours by Slurm job", Target(idle_hours_by("slurm_job"), "{{slurm_job}}", instant=True), unit="h",
                 width=6),
        bargauge("Idle GPU-hours by user", Target(idle_hours_by("user"), "{{user}}", instant=True), unit="h", width=6),
        table("Per workload",
              Target(f"mlwarden_gpu_allocation_info{{{GPU}}}"),
              Target(per_workload(ACTIVITY)),
              Target(per_workload(f"mlwarden_gpu_memory_used_bytes{{{GPU}}}")),
              Target(IDLE_HOURS),
              columns={"info": "info", "activity": "GPU activity", "memory": "GPU memory used",
                       "idle": "Idle GPU-hours"},
              hide=("info", "uuid"),
              units={"GPU activity": "percentunit", "GPU memory used": "bytes", "Idle GPU-hours": "h"},
              overrides=[{"matcher": {"id": "byName", "options": "GPU activity"},
                          "properties": [{"id": "thresholds", "value": {"mode": "absolute", "steps": [
                              {"color": "orange", "value": None}, {"color": "green", "value": IDLE_BELOW}]}},
                                         {"id": "custom.cellOptions", "value": {"type": "color-background"}}]}],
              height=10,
              description="One row per GPU and workload (pod container, Slurm job, container, user): what it "
                          "holds and how busy its GPU is (SM activity, or utilization without GPM)."),
    ])

    exporter = Row("Exporter", [
        stat("Exporter targets", Target(f"up{{{GPU_EXPORTER}}}", "{{instance}}"),
             mappings=UP_DOWN, thresholds=steps(), text_mode="value_and_name", width=6, height=8),
        stat("NVML", Target(f"mlwarden_nvml_up{{{GPU_EXPORTER}}}", "{{instance}}"), mappings=UP_DOWN,
             thresholds=steps(), text_mode="value_and_name", width=6, height=8),
        bargauge("Data age by collector",
                 Target(f"time() - mlwarden_exporter_last_collection_timestamp_seconds{{{GPU_EXPORTER}}}",
                        "{{instance}} {{collector}}"),
                 unit="s", thresholds=steps(("orange", 60), ("red", 300)), width=12, height=8),
        timeseries("Collection duration",
                   Target(f"mlwarden_exporter_collector_duration_seconds{{{GPU_EXPORTER}}}",
                          "{{instance}} {{collector}}"), unit="s"),
        state_timeline("Collector success",
                       Target(f"mlwarden_exporter_collector_success{{{GPU_EXPORTER}}}", "{{instance}} {{collector}}"),
                       mappings=OK_FAILED, thresholds=steps(), width=8),
        table("Exporter versions", Target(f"mlwarden_exporter_build_info{{{GPU_EXPORTER}}}"),
              columns={"v": "info"}, hide=("info",), width=8),
    ])

    return dashboard(
        "mlwarden-gpu-fleet", "mlwarden / GPU fleet",
        "Per machine and GPU: temperature, utilization, memory, power against the limit, throttling, ECC and XID "
        "errors, the processes holding memory, and the exporter's own health.",
        [query_variable(*EXPORTER_JOB_VARIABLE),
         query_variable("instance", "Machine", 'label_values(mlwarden_gpu_info{job=~"$job"}, instance)'),
         query_variable("gpu", "GPU", 'label_values(mlwarden_gpu_info{job=~"$job", instance=~"$instance"}, gpu)')],
        [fleet, heat_power, load, profiling, errors, processes, waste, exporter],
    )


# Jobs and backups ---------------------------------------------------------------------------

JOB = 'instance=~"$instance"'
EXPORTER = 'instance=~"$exporter"'
JOB_LEGEND = "{{job}} on {{instance}}"
HOUR = 3600
DAY = 24 * HOUR


def jobs() -> Json:
    heartbeats = Row("Heartbeats", [
        bargauge(
            "Time since last success, of interval + grace",
            # Each job pushes its own schedule (jobs/report.py): the share is generic, like JobLate.
            Target(f'(time() - mlwarden_job_last_success_timestamp_seconds{{{JOB}, job=~"mlwarden_.*"}})'
                   f' / on(job, instance) group_left() (mlwarden_job_expected_interval_seconds{{{JOB}}}'
                   f' + mlwarden_job_grace_seconds{{{JOB}}})', JOB_LEGEND),
            unit="percentunit", width=12, height=8, thresholds=steps(("orange", 0.9), ("red", 1.0)),
            description="Time since each job's last success as a share of its own expected interval plus grace "
            "(--expected-interval, --grace): red at 100 %, where JobLate fires.",
        ),
        stat("Last run", Target(f'mlwarden_job_success{{{JOB}, job=~"mlwarden_.*"}}', JOB_LEGEND),
             mappings=OK_FAILED, thresholds=steps(), text_mode="value_and_name", width=12, height=8),
        timeseries("Job durations", Target(f'mlwarden_job_duration_seconds{{{JOB}, job=~"mlwarden_.*"}}', JOB_LEGEND),
                   unit="s"),
        bargauge("Time since last push to the Pushgateway",
                 Target(f'time() - push_time_seconds{{{JOB}, job=~"mlwarden_.*"}}', JOB_LEGEND), unit="s",
                 thresholds=steps(("orange", 25 * HOUR), ("red", 8 * DAY))),
        state_timeline("Pushes rejected by the Pushgateway",
                       Target(f'push_failure_time_seconds{{{JOB}, job=~"mlwarden_.*"}} > bool '
                              f'push_time_seconds{{{JOB}, job=~"mlwarden_.*"}}', JOB_LEGEND),
                       mappings=mapping({"0": ("ok", "green"), "1": ("REJECTED", "red")}), thresholds=steps()),
    ])

    backups = Row("Backups", [
        timeseries("Bytes backed up",
                   Target(f'mlwarden_backup_read_bytes{{{JOB}}}', "{{instance}} read"),
                   Target(f'mlwarden_backup_written_bytes{{{JOB}}}', "{{instance}} written (compressed)"),
                   unit="bytes"),
        timeseries("Files backed up", Target(f'mlwarden_backup_files{{{JOB}}}', "{{instance}}"), unit="short"),
        stat("Last backup verified", Target(f'mlwarden_backup_verified{{{JOB}}}', "{{instance}}"),
             mappings=OK_FAILED, thresholds=steps(), text_mode="value_and_name", width=4, height=8),
        stat("Last off-site copy", Target(f'mlwarden_backup_offsite_success{{{JOB}}}', "{{instance}}"),
             mappings=OK_FAILED, thresholds=steps(), text_mode="value_and_name", width=4, height=8,
             description="Absent on machines without an S3 bucket configured."),
        table(
            "Backup catalogs (exporter)",
            Target(f"mlwarden_backups{{{EXPORTER}}}"),
            Target(f"time() - mlwarden_backup_newest_timestamp_seconds{{{EXPORTER}}}"),
            Target(f"mlwarden_backup_size_bytes{{{EXPORTER}}}"),
            Target(f"mlwarden_backup_newest_verified{{{EXPORTER}}}"),
            Target(f"mlwarden_backup_newest_offsite{{{EXPORTER}}}"),
            Target(f"mlwarden_backup_incomplete{{{EXPORTER}}}"),
            columns={"n": "Backups", "age": "Newest age", "size": "Total size", "ver": "Newest verified",
                     "off": "Newest off-site", "inc": "Incomplete"},
            units={"Newest age": "s", "Total size": "bytes"},
            overrides=[{"matcher": {"id": "byRegexp", "options": "Newest (verified|off-site)"},
                        "properties": [{"id": "mappings", "value": mapping({"1": ("yes", "green"), "0": ("NO", "red")})},
                                       {"id": "custom.cellOptions", "value": {"type": "color-background"}}]}],
            height=6,
            description="What is on disk, read by the exporter's backups collector from the catalog.",
        ),
    ])

    drills = Row("Restore drills", [
        stat("Last drill", Target(f'mlwarden_job_success{{{JOB}, job="mlwarden_restore_drill"}}', "{{instance}}"),
             mappings=OK_FAILED, thresholds=steps(), text_mode="value_and_name", width=6, height=8),
        bargauge("Since the last good drill",
                 Target(f'time() - mlwarden_job_last_success_timestamp_seconds{{{JOB}, job="mlwarden_restore_drill"}}',
                        "{{instance}}"),
                 unit="s", thresholds=steps(("orange", 7 * DAY), ("red", 8 * DAY)), width=6),
        timeseries("Drill restore time",
                   Target(f'mlwarden_restore_drill_duration_seconds{{{JOB}}}', "{{instance}}"), unit="s", width=6),
        timeseries("Files verified by the drill",
                   Target(f'mlwarden_restore_drill_verified_files{{{JOB}}}', "{{instance}}"), unit="short", width=6),
    ])

    cleanup = Row("Cleanup", [
        timeseries("Bytes freed and planned",
                   Target(f'mlwarden_cleanup_freed_bytes{{{JOB}}}', "{{instance}} freed"),
                   Target(f'mlwarden_cleanup_planned_bytes{{{JOB}}}', "{{instance}} planned"),
                   unit="bytes", overrides=[dashed(".* planned$")], width=6),
        timeseries("Files deleted and planned",
                   Target(f'mlwarden_cleanup_deleted_files{{{JOB}}}', "{{instance}} deleted"),
                   Target(f'mlwarden_cleanup_planned_files{{{JOB}}}', "{{instance}} planned"),
                   unit="short", overrides=[dashed(".* planned$")], width=6),
        timeseries("Files kept at deletion, by reason",
                   Target(f'mlwarden_cleanup_skipped_files{{{JOB}}} > 0', "{{instance}} {{reason}}"),
                   unit="short", width=6,
                   description="Planned files the last run kept when it came to delete them: changed or locked since "
                   "the plan, replaced, a symlink, vanished, moved out of the root, or behind a mount point. A few now "
                   "and then is normal; the same count every run means something keeps using what cleanup calls old."),
        state_timeline("Safety breaker",
                       Target(f'mlwarden_cleanup_breaker_tripped{{{JOB}}}', "{{instance}}"),
                       mappings=mapping({"0": ("ok", "green"), "1": ("TRIPPED", "red")}), thresholds=steps(), width=6),
    ])

    disks = Row("Health and disks", [
        state_timeline("Health checks", Target(f'mlwarden_health_check_ok{{{JOB}}}', "{{instance}} {{check}}"),
                       mappings=OK_FAILED, thresholds=steps(), width=12),
        bargauge("Disk used (health job)",
                 Target(f'mlwarden_health_disk_used_ratio{{{JOB}}}', "{{instance}} {{path}}"),
                 unit="percentunit", minimum=0, maximum=1, thresholds=steps(("orange", 0.85), ("red", 0.90)), width=12),
        bargauge("Artifact filesystems used (exporter)",
                 Target(f"1 - mlwarden_artifacts_filesystem_free_bytes{{{EXPORTER}}} / "
                        f"mlwarden_artifacts_filesystem_size_bytes{{{EXPORTER}}}", "{{instance}} {{directory}}"),
                 unit="percentunit", minimum=0, maximum=1, thresholds=steps(("orange", 0.85), ("red", 0.90)), width=6),
        timeseries("Artifact directories",
                   Target(f"mlwarden_artifacts_size_bytes{{{EXPORTER}}}", "{{instance}} {{directory}}"),
                   unit="bytes", width=6),
        timeseries("Free space in 24 hours at the current rate",
                   Target(f"predict_linear(mlwarden_artifacts_filesystem_free_bytes{{{EXPORTER}}}[6h], 86400)",
                          "{{instance}} {{directory}}"),
                   unit="bytes", thresholds=steps(("red", 0)), width=6,
                   description="Below zero: DiskWillFillIn24Hours fires once the disk is also 60 % full."),
        timeseries("Files in artifact directories",
                   Target(f"mlwarden_artifacts_files{{{EXPORTER}}}", "{{instance}} {{directory}}"), unit="short", width=6),
    ])

    return dashboard(
        "mlwarden-jobs", "mlwarden / Jobs and backups",
        "Backups, restore drills, cleanup and health checks: when each last succeeded, what it moved, and whether "
        "the backups on disk are verified and copied off-site.",
        [query_variable("instance", "Machine (jobs)", "label_values(mlwarden_job_last_run_timestamp_seconds, instance)"),
         query_variable("exporter", "Machine (exporter)", "label_values(mlwarden_exporter_build_info, instance)")],
        [heartbeats, backups, drills, cleanup, disks],
    )


# Relay ----------------------------------------------------------------------------------------

# The relay's scrape jobs are the ones serving its watchdog state (always present), whatever their name.
RELAY = 'job=~"$job", instance=~"$instance"'
WATCHDOG_COLORS = {"new": "blue", "up": "green", "late": "orange", "down": "red"}


def relay() -> Json:
    health = Row("Relay and watchdog", [
        stat("Relay", Target(f"up{{{RELAY}}}", "{{instance}}"), mappings=UP_DOWN,
             thresholds=steps(), text_mode="value_and_name", width=6),
        stat("Watchdog state", Target(f"mlwarden_relay_watchdog_state{{{RELAY}}} == 1", "{{state}}"),
             text_mode="name", overrides=by_name_color(WATCHDOG_COLORS),
             thresholds={"mode": "absolute", "steps": [{"color": "text", "value": None}]}, width=6,
             description="The always-firing Watchdog alert's heartbeat through Prometheus and Alertmanager."),
        stat("Since the last heartbeat",
             Target(f"time() - mlwarden_relay_watchdog_last_seen_timestamp_seconds{{{RELAY}}}", "{{instance}}"),
             unit="s", thresholds=steps(("orange", 60), ("red", 300)), width=6),
        stat("Dead letters", Target(f"sum(mlwarden_relay_dead_letters_total{{{RELAY}}}) or vector(0)"),
             thresholds=steps(("red", 1)), width=6),
        # Rows are machines, the colour is the state: the one-hot state gauge folded into one number.
        state_timeline(
            "Watchdog over time",
            Target(" + ".join(f'sum by (instance) (mlwarden_relay_watchdog_state{{{RELAY}, state="{state}"}}) * {n}'
                              for n, state in enumerate(WATCHDOG_COLORS) if n), "{{instance}}"),
            mappings=mapping({str(n): (state, color) for n, (state, color) in enumerate(WATCHDOG_COLORS.items())}),
            thresholds=steps(), width=24, height=4,
        ),
    ])

    intake = Row("Intake", [
        timeseries("Webhooks received",
                   Target(f"sum by (outcome) (rate(mlwarden_relay_webhooks_received_total{{{RELAY}}}[$__rate_interval]))",
                          "{{outcome}}"),
                   unit="reqps", width=6, overrides=by_name_color({"accepted": "green", "invalid": "red",
                                                          "unauthorized": "red", "unavailable": "orange"})),
        timeseries("Alerts received",
                   Target(f"sum by (status) (rate(mlwarden_relay_alerts_received_total{{{RELAY}}}[$__rate_interval]))",
                          "{{status}}"),
                   unit="ops", width=6),
        timeseries("Suppressed by cooldown",
                   Target(f"sum by (severity) (increase(mlwarden_relay_notifications_suppressed_total{{{RELAY}}}"
                          f"[$__rate_interval]))", "{{severity}}"),
                   unit="short", width=6),
        timeseries("Escalations",
                   Target(f"sum by (severity) (increase(mlwarden_relay_escalations_total{{{RELAY}}}[$__rate_interval]))",
                          "{{severity}}"),
                   unit="short", width=6),
    ])

    delivery = Row("Delivery", [
        timeseries("Delivered",
                   Target(f"sum by (destination, integration) "
                          f"(increase(mlwarden_relay_deliveries_total{{{RELAY}}}[$__rate_interval]))",
                          "{{destination}} ({{integration}})"),
                   unit="short"),
        timeseries("Retried",
                   Target(f"sum by (destination, integration) "
                          f"(increase(mlwarden_relay_delivery_retries_total{{{RELAY}}}[$__rate_interval]))",
                          "{{destination}} ({{integration}})"),
                   unit="short"),
        timeseries("Dead-lettered",
                   Target(f"sum by (reason) (increase(mlwarden_relay_dead_letters_total{{{RELAY}}}[$__rate_interval]))",
                          "{{reason}}"),
                   unit="short", thresholds=steps(("red", 1))),
        timeseries("Outbox depth", Target(f"mlwarden_relay_outbox_depth{{{RELAY}}}", "{{instance}}"),
                   unit="short", width=12, minimum=0),
        timeseries("Oldest notice waiting", Target(f"mlwarden_relay_outbox_oldest_age_seconds{{{RELAY}}}", "{{instance}}"),
                   unit="s", width=12, thresholds=steps(("orange", 300), ("red", 900)), show_thresholds=True),
    ])

    return dashboard(
        "mlwarden-relay", "mlwarden / Alert relay",
        "What the relay received, suppressed, escalated and delivered; its outbox; the Watchdog heartbeat.",
        [query_variable("job", "Relay job", "label_values(mlwarden_relay_watchdog_state, job)"),
         query_variable("instance", "Relay", 'label_values(up{job=~"$job"}, instance)')],
        [health, intake, delivery],
    )


DASHBOARDS = {"gpu-fleet.json": gpu_fleet, "jobs.json": jobs, "relay.json": relay}


def render() -> dict[str, str]:
    return {name: json.dumps(build(), indent=2) + "\n" for name, build in DASHBOARDS.items()}


def main(argv: list[str]) -> int:
    """Write the dashboards; ``--check`` only reports (exit 1) which are stale."""
    stale = []
    for name, text in render().items():
        path = HERE / name
        if path.exists() and path.read_text() == text:
            continue
        stale.append(name)
        if "--check" not in argv:
            path.write_text(text)
    if stale:
        print(("stale: " if "--check" in argv else "wrote: ") + ", ".join(stale))
    return 1 if stale and "--check" in argv else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
