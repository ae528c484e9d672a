"""Prometheus metrics built from the daemon's live state at scrape time.

A custom collector, rather than counters and gauges updated as things
happen, because the daemon already keeps every number (sensor samples,
manager counters): mirroring them into client-library objects would mean a
second copy that can drift, and a hook in every manager. Building the
families on demand costs one pass over state that is small, and only when
someone scrapes.

The collector lives in its own ``CollectorRegistry`` so that the process
metrics of the global registry (and anything a library registers there)
never leak into what the daemon exposes, and so tests can create several.

Every read is guarded: a scrape must never fail because one part of the
daemon (hardware, downstream, policies) did not start or a sensor read
failed; the part is then simply absent from the output.
"""

from __future__ import annotations

import logging
from typing import Callable, Dict, Iterable, Iterator, List, Optional

from prometheus_client.core import (CollectorRegistry, CounterMetricFamily, GaugeMetricFamily,
                                    InfoMetricFamily, Metric, SummaryMetricFamily)
from prometheus_client.samples import Sample

from nrm import protocol
from nrm.http.sources import Sources
from nrm.log import RateLimitedLog

log = logging.getLogger(__name__)
rl_log = RateLimitedLog(log, 30.0)


#: application-manager counters -> the reason label they are exported under
_APP_DROP_REASONS = {"dropped_containers": "too_many_containers",
                     "dropped_apps": "too_many_apps", "dropped_invalid": "invalid"}


def _num(value) -> Optional[float]:
    """A float, or None for values that are missing or not numbers."""
    if value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


class DaemonCollector:
    """Turns a ``Daemon`` into metric families; see docs/telemetry.md.

    ``http_stats`` is a callable returning the web server's own counters
    (event-stream clients, messages, drops), kept separate so the collector
    does not depend on the server module.
    """

    def __init__(self, sources: Sources,
                 http_stats: Optional[Callable[[], Dict[str, int]]] = None):
        self.sources = sources
        self.http_stats = http_stats

    # prometheus_client calls describe() at registration when present; without
    # it, it calls collect(), which would read hardware before the daemon is
    # fully started. An empty description is allowed for custom collectors.
    def describe(self) -> List[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        for part in (self._identity, self._power, self._cpus, self._work, self._downstream,
                     self._sensors, self._policies, self._requests, self._applications,
                     self._http):
            try:
                yield from part()
            except Exception as exc:
                # One broken part must not hide all the others from the scrape.
                rl_log.warning("metrics: %s failed: %s", part.__name__.lstrip("_"), exc,
                               key=part.__name__)

    # ------------------------------------------------------------------ parts

    def _identity(self) -> Iterable[Metric]:
        d = self.sources
        from nrm import __version__
        platform = d.platform
        runtime = d.runtime
        info = InfoMetricFamily("nrm", "nrmd version, hardware backend and task runtime")
        info.add_metric([], {
            "version": __version__,
            "backend": platform.backend_name if platform is not None else "none",
            "runtime": runtime.name if runtime is not None else "none",
        })
        yield info
        yield GaugeMetricFamily("nrm_emulated",
                                "1 when power and temperatures come from the emulated node model",
                                value=1.0 if platform is not None and platform.emulated else 0.0)
        yield GaugeMetricFamily("nrm_start_time_seconds", "when nrmd started (Unix time)",
                                value=float(d.started))

    def _power(self) -> Iterable[Metric]:
        d = self.sources
        if d.power_cap is not None:
            yield GaugeMetricFamily("nrm_node_power_cap_watts",
                                    "node power cap set with nrm setpower (absent when none)",
                                    value=float(d.power_cap))
        sample = d.latest_sample
        if not sample:
            return
        node = _num(sample.get("node_power_w"))
        if node is not None:
            yield GaugeMetricFamily("nrm_node_power_watts",
                                    "package plus DRAM power of the node, latest sample",
                                    value=node)
        yield GaugeMetricFamily("nrm_sample_time_seconds",
                                "wall-clock time of the latest sensor sample",
                                value=float(sample.get("wall_time") or 0.0))
        families = {
            "power_w": GaugeMetricFamily("nrm_package_power_watts",
                                         "package power over the last sensor period",
                                         labels=["package"]),
            "energy_j": CounterMetricFamily("nrm_package_energy_joules",
                                            "package energy since nrmd started reading it",
                                            labels=["package"]),
            "dram_power_w": GaugeMetricFamily("nrm_dram_power_watts",
                                              "DRAM power over the last sensor period",
                                              labels=["package"]),
            "dram_energy_j": CounterMetricFamily("nrm_dram_energy_joules",
                                                 "DRAM energy since nrmd started reading it",
                                                 labels=["package"]),
            "temperature_c": GaugeMetricFamily("nrm_package_temperature_celsius",
                                               "package temperature", labels=["package"]),
        }
        for pkg, entry in sorted((sample.get("packages") or {}).items(), key=lambda kv: kv[0]):
            for key, family in families.items():
                value = _num(entry.get(key))
                if value is not None:
                    family.add_metric([str(pkg)], value)
        for family in families.values():
            if family.samples:
                yield family

    def _cpus(self) -> Iterable[Metric]:
        platform = self.sources.platform
        if platform is None:
            return
        wanted = (("cpu.duty_cycle", "nrm_cpu_duty_cycle_level",
                   f"clock-modulation level (1..{platform.duty_cycle_levels}, "
                   f"{platform.duty_cycle_levels} is full speed)"),
                  ("cpu.frequency", "nrm_cpu_frequency_hertz", "cpu frequency"))
        available = {s.name: s for s in platform.signals()}
        for signal, name, doc in wanted:
            info = available.get(signal)
            if info is None:
                continue
            family = GaugeMetricFamily(name, doc, labels=["cpu"])
            for cpu in info.indices:
                try:
                    value = platform.read(signal, cpu)
                except Exception as exc:
                    rl_log.warning("metrics: reading %s[%d]: %s", signal, cpu, exc,
                                   key=signal)
                    continue
                family.add_metric([str(cpu)], value)
            yield family

    def _work(self) -> Iterable[Metric]:
        d = self.sources
        manager = d.containers
        if manager is None:
            return
        containers = GaugeMetricFamily("nrm_containers", "containers by state",
                                       labels=["state"])
        containers.add_metric(["running"], len(manager.containers))
        containers.add_metric(["waiting"], manager.waiting_count)
        yield containers
        running = exited = 0
        for c in list(manager.containers.values()):
            for t in c.tasks.values():
                if t.finished:
                    exited += 1
                else:
                    running += 1
        tasks = GaugeMetricFamily("nrm_tasks", "tasks of live containers by state",
                                  labels=["state"])
        tasks.add_metric(["running"], running)
        tasks.add_metric(["exited"], exited)
        yield tasks
        counters = manager.counters
        for key, name, doc in (
                ("tasks_started", "nrm_tasks_started", "tasks started"),
                ("tasks_finished", "nrm_tasks_finished", "tasks finished"),
                ("spawn_failures", "nrm_task_spawn_failures", "tasks that failed to start"),
                ("containers_started", "nrm_containers_started", "containers created"),
                ("containers_finished", "nrm_containers_finished", "containers ended"),
                ("handovers", "nrm_slice_handovers", "queued runs started as the "
                 "slice's last task exited"),
                ("handovers_occupied", "nrm_slice_handovers_occupied", "hand-overs "
                 "deferred until the daemon killed what the last task left"),
                ("handovers_cancelled", "nrm_slice_handovers_cancelled", "promised "
                 "slices taken back (client left, passed over, shutdown)")):
            if key in counters:
                yield CounterMetricFamily(name, doc, value=counters[key])

    def _downstream(self) -> Iterable[Metric]:
        ingest = self.sources.ingest
        if ingest is None:
            return
        received = CounterMetricFamily("nrm_downstream_messages_received",
                                       "downstream messages received, by endpoint",
                                       labels=["endpoint"])
        decoded = CounterMetricFamily("nrm_downstream_messages_decoded",
                                      "downstream messages decoded, by endpoint",
                                      labels=["endpoint"])
        dropped = CounterMetricFamily("nrm_downstream_messages_dropped",
                                      "downstream messages dropped, by endpoint and reason "
                                      "(endpoint 'any' for checks made after decoding)",
                                      labels=["endpoint", "reason"])
        errors = CounterMetricFamily("nrm_downstream_callback_errors",
                                     "downstream messages whose handling raised",
                                     labels=["endpoint"])
        for endpoint, value in sorted(dict(ingest.counters).items()):
            if isinstance(value, dict):
                for key, count in sorted(value.items()):
                    if key == "received":
                        received.add_metric([endpoint], count)
                    elif key == "decoded":
                        decoded.add_metric([endpoint], count)
                    elif key == "callback_errors":
                        errors.add_metric([endpoint], count)
                    elif key.startswith("dropped_"):
                        dropped.add_metric([endpoint, key[len("dropped_"):]], count)
            elif isinstance(value, int):
                # Older daemons counted ownership checks next to the tables.
                dropped.add_metric(["any", endpoint], value)
        # Ownership checks (unknown_container, foreign_sender) happen after
        # decoding, whatever the endpoint.
        for reason, count in sorted(self.sources.downstream_rejects.items()):
            dropped.add_metric(["any", reason], count)
        apps = self.sources.apps
        if apps is not None:
            for key, count in sorted(apps.counters.items()):
                if key.startswith("dropped_"):
                    reason = _APP_DROP_REASONS.get(key, key[len("dropped_"):])
                    dropped.add_metric(["any", reason], count)
            yield CounterMetricFamily("nrm_downstream_messages_handled",
                                      "downstream messages accounted by the application "
                                      "manager", value=apps.counters.get("handled", 0))
        yield received
        yield decoded
        yield dropped
        yield errors

    def _sensors(self) -> Iterable[Metric]:
        sensors = self.sources.sensors
        if sensors is None:
            return
        s = sensors.stats()
        ticks = int(s.get("ticks", 0))
        yield GaugeMetricFamily("nrm_sensor_period_seconds", "configured sensor period",
                                value=float(s.get("period_s", 0.0)))
        for key, name, doc in (("ticks", "nrm_sensor_ticks", "sensor ticks"),
                               ("errors", "nrm_sensor_errors", "sensor ticks that failed"),
                               ("missed_ticks", "nrm_sensor_missed_ticks",
                                "ticks skipped because a tick overran"),
                               ("late_ticks", "nrm_sensor_late_ticks",
                                "ticks that started more than half a period late"),
                               ("callback_errors", "nrm_sensor_callback_errors",
                                "samples whose delivery raised")):
            if key in s:
                yield CounterMetricFamily(name, doc, value=s[key])
        for stat, name, doc in (("duration", "nrm_sensor_tick_duration_seconds",
                                 "time to take one sample (quantiles over recent ticks)"),
                                ("lateness", "nrm_sensor_tick_lateness_seconds",
                                 "tick start after its deadline (quantiles over recent ticks)")):
            summary = SummaryMetricFamily(name, doc, count_value=ticks,
                                          sum_value=float(s.get(f"mean_{stat}_s", 0.0)) * ticks)
            for q, key in (("0.5", f"{stat}_p50_s"), ("0.99", f"{stat}_p99_s")):
                if key in s:
                    summary.samples.append(Sample(name, {"quantile": q}, float(s[key])))
            yield summary
            if f"max_{stat}_s" in s:
                yield GaugeMetricFamily(name.replace("_seconds", "_max_seconds"),
                                        f"largest tick {stat} since nrmd started",
                                        value=float(s[f"max_{stat}_s"]))

    def _policies(self) -> Iterable[Metric]:
        policies = self.sources.policies
        if policies is None:
            return
        c = policies.counters
        yield CounterMetricFamily("nrm_policy_decisions", "power-policy control writes applied",
                                  value=c.get("decisions", 0))
        yield CounterMetricFamily("nrm_policy_write_errors",
                                  "power-policy control writes that failed",
                                  value=c.get("write_errors", 0))
        yield CounterMetricFamily("nrm_policy_start_errors",
                                  "containers whose power policy could not start",
                                  value=c.get("policy_errors", 0))
        yield GaugeMetricFamily("nrm_policy_active_containers",
                                "containers with a power policy running",
                                value=len(policies.active))

    def _requests(self) -> Iterable[Metric]:
        d = self.sources
        by_type = CounterMetricFamily("nrm_requests", "client requests dispatched, by type",
                                      labels=["type"])
        # Every request type from the start, 0 until used: a rate over a
        # counter that appears mid-series loses its first increments.
        counts = dict.fromkeys(protocol.request_tags(), 0)
        counts.update(d.request_counts)
        for name, count in sorted(counts.items()):
            by_type.add_metric([name], count)
        yield by_type
        upstream = d.upstream
        if upstream is None:
            return
        c = upstream.counters
        yield CounterMetricFamily("nrm_request_errors",
                                  "client requests rejected before dispatch (malformed, "
                                  "invalid, version)", value=c.get("request_errors", 0))
        yield CounterMetricFamily("nrm_unauthenticated_connections",
                                  "connections refused for lack of peer credentials",
                                  value=c.get("unauthenticated", 0))

    def _applications(self) -> Iterable[Metric]:
        apps = self.sources.apps
        if apps is None:
            return
        progress = CounterMetricFamily("nrm_application_progress",
                                       "progress reported by instrumented applications",
                                       labels=["container", "task", "app"])
        rate = GaugeMetricFamily("nrm_application_progress_rate",
                                 "progress per second over the application manager's window",
                                 labels=["container", "task", "app"])
        snap = apps.snapshot()
        for cid, body in sorted(snap.get("containers", {}).items()):
            for app in body.get("apps", []):
                labels = [cid, str(app.get("task")), str(app.get("app"))]
                progress.add_metric(labels, app.get("progress", 0))
                rate.add_metric(labels, app.get("rate", 0.0))
        yield progress
        yield rate

    def _http(self) -> Iterable[Metric]:
        if self.http_stats is None:
            return
        s = self.http_stats()
        yield GaugeMetricFamily("nrm_http_event_clients",
                                "dashboard clients connected to the event stream",
                                value=s.get("event_clients", 0))
        yield CounterMetricFamily("nrm_http_event_messages",
                                  "event-stream messages queued to clients",
                                  value=s.get("event_messages", 0))
        yield CounterMetricFamily("nrm_http_event_messages_dropped",
                                  "event-stream messages dropped for slow clients",
                                  value=s.get("event_dropped", 0))
        yield CounterMetricFamily("nrm_http_event_clients_refused",
                                  "event-stream connections refused (too many clients)",
                                  value=s.get("event_refused", 0))


def make_registry(sources: Sources, http_stats=None) -> CollectorRegistry:
    """A registry holding only the daemon's collector."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DaemonCollector(sources, http_stats))
    return registry
