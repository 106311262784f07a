"""Prometheus metrics, in a registry of each app's own (tests build many apps in one process).

Two sources:

- this process's HTTP traffic and submissions (counters and histograms updated in place);
- figures owned by others, read at scrape time by :class:`_SharedCollector`: queue depths
  from the broker, and the job and explanation counters that workers keep in the store
  (:mod:`classlens.core.stats`). A source that cannot be read is left out of that scrape.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

from celery import Celery
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from classlens.core import stats
from classlens.core.queue import queue_depths
from classlens.core.store import Store
from model_store.catalog import Catalog
from service.model_info import model_info

log = logging.getLogger(__name__)

JOB_KINDS = ("explanation", "audit", "analysis", "model")


class _SharedCollector(Collector):
    def __init__(self, store: Store, celery: Celery, catalog: Catalog):
        self.store = store
        self.celery = celery
        self.catalog = catalog

    def describe(self) -> list[Metric]:
        return []  # nothing to read when registering: the store may not be up yet

    def collect(self) -> Iterator[Metric]:
        yield from self._guarded(self._queues)
        yield from self._guarded(self._jobs)

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


class Metrics:
    """The app's registry and the metrics it updates itself."""

    def __init__(self, store: Store, celery: Celery, catalog: Catalog):
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
        self.registry.register(_SharedCollector(store, celery, catalog))
