"""Prometheus metrics, in a registry of each app's own (tests build many apps in one process).

Two sources:

- this process's HTTP traffic and submissions (counters and histograms updated in place);
- figures owned by others, read at scrape time by :class:`_SharedCollector`: queue depths
  from the broker, the workers' heartbeat, the job and explanation counters that workers keep in
  the store (:mod:`classlens.core.stats`), the signals of explanations and their drift from each
  version's reference audit (:mod:`classlens.core.monitoring`). A source that cannot be read is
  left out of that scrape.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator

from celery import Celery
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from classlens.core import monitoring, stats
from classlens.core.heartbeat import last_beat
from classlens.core.queue import queue_depths
from classlens.core.settings import Settings
from classlens.core.store import Store
from model_store.catalog import Catalog
from service.model_info import model_info

log = logging.getLogger(__name__)

JOB_KINDS = ("explanation", "audit", "analysis", "model")


class _SharedCollector(Collector):
    def __init__(self, store: Store, celery: Celery, catalog: Catalog, settings: Settings):
        self.store = store
        self.celery = celery
        self.catalog = catalog
        self.settings = settings

    def describe(self) -> list[Metric]:
        return []  # nothing to read when registering: the store may not be up yet

    def collect(self) -> Iterator[Metric]:
        yield from self._guarded(self._queues)
        yield from self._guarded(self._jobs)
        yield from self._guarded(self._workers)
        yield from self._guarded(self._signals)
        yield from self._guarded(self._drift)

    def _guarded(self, source: Callable[[], list[Metric]]) -> list[Metric]:
        try:
            return source()
        except Exception as error:  # a scrape never fails for a source that is away
            log.warning("metrics source %s failed: %s", source.__name__, error)
            return []

    def _queues(self) -> list[Metric]:
        depth = GaugeMetricFamily("classlens_queue_depth", "Messages waiting in each queue.", labels=["queue"])
        for queue, count in queue_depths(self.celery).items():
            depth.add_metric([queue], count)
        return [depth]

    def _jobs(self) -> list[Metric]:
        jobs = CounterMetricFamily("classlens_jobs", "Finished jobs.", labels=["kind", "model", "status"])
        durations = HistogramMetricFamily(
            "classlens_job_duration_seconds", "Run time of finished jobs in a worker.", labels=["kind", "model"]
        )
        emergence = CounterMetricFamily(
            "classlens_emergence_layer",
            "Explained classes by the layer at which they emerged (never: not by the last layer).",
            labels=["model", "layer"],
        )
        for entry in (self.catalog.entries[key] for key in sorted(self.catalog.entries)):
            model = entry.reference
            figures = stats.read_model_stats(self.store, model, model_info(entry.manifest).layers, JOB_KINDS)
            for (kind, status), count in figures.jobs.items():
                jobs.add_metric([kind, model, status], count)
            for kind, buckets in figures.duration_buckets.items():
                labelled = [("+Inf" if bound == float("inf") else f"{bound:g}", count) for bound, count in buckets]
                durations.add_metric([kind, model], labelled, figures.duration_sum_s[kind])
            for layer, count in figures.emergence.items():
                emergence.add_metric([model, layer], count)
        return [jobs, durations, emergence]

    def _workers(self) -> list[Metric]:
        beat = last_beat(self.store)
        up = GaugeMetricFamily(
            "classlens_worker_up", "1 while some worker has beaten within three heartbeat periods, else 0."
        )
        up.add_metric([], 0 if beat is None else 1)
        found: list[Metric] = [up]
        if beat is not None:
            age = GaugeMetricFamily("classlens_worker_heartbeat_age_seconds", "Seconds since the freshest heartbeat.")
            age.add_metric([], max(0.0, time.time() - float(str(beat.get("at", 0)))))
            found.append(age)
        return found

    def _signals(self) -> list[Metric]:
        """The signals of finished explanations (predicted class only), per model version."""
        histograms = {
            name: HistogramMetricFamily(f"classlens_prediction_{name}", help_text, labels=["model"])
            for name, help_text in (
                ("confidence", "Top-1 probability of finished explanations."),
                ("margin", "Top-1 minus top-2 probability of finished explanations."),
                ("identifiability", "Last-layer mean image-token identifiability of the predicted class."),
                ("concentration", "Share of the predicted class's last-block map mass in its top 10 % of tokens."),
            )
        }
        classes = CounterMetricFamily(
            "classlens_predictions",
            "Finished explanations by predicted class (classes beyond the configured count: other).",
            labels=["model", "class"],
        )
        emergence = CounterMetricFamily(
            "classlens_predicted_emergence_layer",
            "Finished explanations by the emergence layer of the predicted class (never: not by the last layer).",
            labels=["model", "layer"],
        )
        limit = self.settings.metrics_max_classes
        for entry in (self.catalog.entries[key] for key in sorted(self.catalog.entries)):
            model = entry.reference
            count = entry.manifest.labels.count
            figures = monitoring.read_stats(self.store, model, model_info(entry.manifest).layers, limit, count)
            for name, (buckets, total) in figures.histograms.items():
                labelled = [("+Inf" if bound == float("inf") else f"{bound:g}", n) for bound, n in buckets]
                histograms[name].add_metric([model], labelled, total)
            labels = entry.labels() if figures.classes else []
            for slot, n in figures.classes.items():
                classes.add_metric([model, slot if slot == monitoring.OTHER else labels[int(slot)]], n)
            for layer, n in figures.emergence.items():
                emergence.add_metric([model, layer], n)
        return [*histograms.values(), classes, emergence]

    def _drift(self) -> list[Metric]:
        """Per model version with a reference: the window's size and, once it is large enough, each signal's PSI."""
        settings = self.settings
        psi = GaugeMetricFamily(
            "classlens_drift_psi",
            "Population stability index of a signal between the recent explanations and the reference audit.",
            labels=["model", "signal"],
        )
        window = GaugeMetricFamily(
            "classlens_drift_window", "Recent explanations compared with the reference.", labels=["model"]
        )
        reference_size = GaugeMetricFamily(
            "classlens_drift_reference_images", "Images of the reference audit.", labels=["model"]
        )
        for model in sorted(entry.reference for entry in self.catalog.entries.values()):
            reference = monitoring.load_reference(self.store, model)
            if reference is None:
                continue
            recent = monitoring.read_window(self.store, model, settings.drift_window)
            window.add_metric([model], len(recent))
            reference_size.add_metric([model], len(reference.signals))
            if len(recent) < settings.drift_min_window:
                continue
            found = monitoring.drift(
                reference, recent, bins=settings.drift_bins, max_classes=settings.metrics_max_classes
            )
            for signal, value in found.items():
                psi.add_metric([model, signal], value)
        return [psi, window, reference_size]


class Metrics:
    """The app's registry and the metrics it updates itself."""

    def __init__(self, store: Store, celery: Celery, catalog: Catalog, settings: Settings):
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "classlens_http_requests",
            "HTTP requests by route and status.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "classlens_http_request_duration_seconds",
            "HTTP request latency by route.",
            ["method", "route"],
            registry=self.registry,
        )
        self.submissions = Counter(
            "classlens_submissions",
            "Submitted explanations by outcome: cached (a cache hit), joined (in flight already) or queued.",
            ["kind", "outcome"],
            registry=self.registry,
        )
        self.audit_images = Counter(
            "classlens_audit_images",
            "Images in submitted audits, by the audit's outcome (cached, joined or queued).",
            ["outcome"],
            registry=self.registry,
        )
        self.rejected_audits = Counter(
            "classlens_rejected_audits",
            "Audits refused before queueing, by problem (a bad image, an unsafe zip, an unknown label...).",
            ["problem"],
            registry=self.registry,
        )
        self.analysis_images = Counter(
            "classlens_analysis_images",
            "Images in submitted analyses, by the analysis' outcome (cached, joined or queued).",
            ["outcome"],
            registry=self.registry,
        )
        self.rejected_analyses = Counter(
            "classlens_rejected_analyses",
            "Analyses refused before queueing, by problem (too few images, a missing second model...).",
            ["problem"],
            registry=self.registry,
        )
        self.rejected_images = Counter(
            "classlens_rejected_images",
            "Uploads refused before queueing, by problem.",
            ["problem"],
            registry=self.registry,
        )
        self.registry.register(_SharedCollector(store, celery, catalog, settings))
