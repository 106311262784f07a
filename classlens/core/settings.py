"""All configuration, read from the environment into one typed object.

Nothing reads the environment at import time: entry points build a
:class:`Settings` (``Settings()``) and pass it down.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


def redacted_url(url: str) -> str:
    """``url`` with its password (``redis://:secret@host``, ``rediss://user:secret@host``) replaced, for logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = f"{parts.username}:" if parts.username else ":"
    host = parts.hostname or ""
    netloc = f"{user}***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def _default_data_dir() -> Path:
    return Path.home() / ".local" / "share" / "classlens"


class Settings(BaseSettings):
    """``CLASSLENS_*`` environment variables, typed."""

    model_config = SettingsConfigDict(env_prefix="CLASSLENS_", extra="ignore")

    # Extra model store roots, searched first (os.pathsep-separated in the
    # environment: CLASSLENS_MODEL_DIRS=/models:/more).
    model_dirs: Annotated[list[Path], NoDecode] = Field(default_factory=list)
    # Local state: models added with `classlens models add` (data_dir/models) and,
    # without Redis, the embedded broker, result store and cache.
    data_dir: Path = Field(default_factory=_default_data_dir)

    # The service. Without a Redis URL the broker, store and cache are
    # embedded under data_dir; REDIS_URL (or CLASSLENS_REDIS_URL) selects Redis.
    redis_url: str | None = Field(default=None, validation_alias=AliasChoices("CLASSLENS_REDIS_URL", "REDIS_URL"))
    # How long job records, uploaded images and results (the cache) are kept.
    result_ttl_s: int = Field(default=24 * 3600, gt=0)
    # Celery's soft limit raises inside the task (the job is marked failed); the hard limit kills it.
    task_soft_time_limit_s: int = Field(default=120, gt=0)
    task_time_limit_s: int = Field(default=180, gt=0)
    # Largest request body (an image upload, an audit zip) before a 413.
    max_upload_bytes: int = Field(default=20 * 1024 * 1024, gt=0)
    # Largest image, counted before any pixel is decoded.
    max_image_pixels: int = Field(default=40_000_000, gt=0)
    # Images the API decodes at once (each up to max_image_pixels x 4 bytes); a request waits up to
    # api_decode_wait_s for a turn, then gets a 503. Bounds the API's memory whatever the uploads.
    api_max_concurrent_decodes: int = Field(default=2, ge=1)
    api_decode_wait_s: float = Field(default=30.0, gt=0)
    # Upper bound of the long-poll `wait` parameter, in seconds.
    max_wait_s: float = Field(default=30.0, ge=0)
    # A worker refreshes its heartbeat this often; /readyz wants one younger than three periods.
    worker_heartbeat_s: float = Field(default=5.0, gt=0)
    # The contract the API serves and enforces. Default: openapi.yaml at the top of
    # the source tree; an installed (non-editable) package must be told where it is.
    openapi_path: Path | None = None
    # Explain through a model's ONNX explainer graph (`classlens models export-onnx`) with
    # onnxruntime when the manifest has one and the request needs no gradients ("auto"), or never ("off").
    onnx: Literal["auto", "off"] = "auto"
    # Polling of the embedded (filesystem) broker, in seconds.
    embedded_poll_s: float = Field(default=0.05, gt=0)

    # Speed. Where a worker runs its models: "auto" is CUDA when present, else CPU;
    # the device is chosen in the worker process after it forks, never in a parent.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Forward passes on CUDA in float16 or bfloat16 ("float32": none); the projection, ranks and
    # gradient map stay in float32. Ignored on CPU (with a log line). See docs/gpu.md for the tolerance.
    precision: Literal["float32", "float16", "bfloat16"] = "float32"
    # Cross-request batching of explain jobs: a worker that starts a job also takes up to
    # batch_max - 1 other queued jobs of the same model and parameters (waiting at most
    # batch_wait_ms for more to arrive) and explains them in one forward pass; 1 turns it off.
    # Both the API and the workers read it. Waiting is off by default: batches form from the jobs
    # queued while a pass runs, so a lone job never waits (docs/benchmarks.md, cross-request batching).
    batch_max: int = Field(default=8, ge=1, le=64)
    batch_wait_ms: float = Field(default=0.0, ge=0, le=1000)

    # Batch audits (POST /v1/audits). An audit runs one task over all its images, so it
    # gets its own, longer time limits (the explain limits would cut a large audit short).
    audit_max_images: int = Field(default=1000, gt=0)
    audit_batch_size: int = Field(default=32, gt=0)
    audit_soft_time_limit_s: int = Field(default=1800, gt=0)
    audit_time_limit_s: int = Field(default=1900, gt=0)
    # Zip safety, judged from the central directory before anything is inflated: entries of
    # any kind (directories included), the sum of the declared uncompressed sizes, one file's size.
    audit_max_zip_entries: int = Field(default=2000, gt=0)
    audit_max_uncompressed_bytes: int = Field(default=256 * 1024 * 1024, gt=0)
    audit_max_file_bytes: int = Field(default=20 * 1024 * 1024, gt=0)

    # Representation analyses (POST /v1/analyses): one task over all the images, on its own
    # queue, with limits of its own. A zip is judged by the audit_max_zip_* limits above.
    analysis_max_images: int = Field(default=1024, gt=0)
    analysis_soft_time_limit_s: int = Field(default=1800, gt=0)
    analysis_time_limit_s: int = Field(default=1900, gt=0)

    # Models managed while the service runs (POST/DELETE /v1/models, `classlens models add`).
    # The API's and every worker's catalog look for added, replaced or disabled versions at most this
    # often (a stat of each root's */*/manifest.yaml and DISABLED files, re-read only when they changed),
    # and at once when a reference is not found; 0 looks on every lookup.
    catalog_refresh_s: float = Field(default=2.0, ge=0)
    # A worker keeps at most this many loaded models, and at most this many bytes of their parameters
    # and buffers; the least recently used is evicted first (logged with its size and the reason).
    model_cache_max_models: int = Field(default=4, ge=1)
    model_cache_max_bytes: int = Field(default=2 * 1024**3, gt=0)
    # POST /v1/models: the largest upload (weights and configs together); other routes keep
    # max_upload_bytes. The files are written under data_dir/uploads/<job id>, which the API and the
    # workers must share (as they share the store roots), and removed when the job ends.
    max_model_upload_bytes: int = Field(default=4 * 1024**3, gt=0)
    # Registering loads the model once to prove it fits (and reads its structure): its own limits.
    model_add_soft_time_limit_s: int = Field(default=600, gt=0)
    model_add_time_limit_s: int = Field(default=660, gt=0)

    # Holding under abuse (`classlens serve`, waitress). At most this many requests may long-poll
    # (`?wait=`) at once; beyond it a poll answers at once with the job as it is, so that /livez,
    # /readyz and short requests always find a thread (serve lowers it to half its --threads).
    max_long_polls: int = Field(default=8, ge=0)
    # Open connections waitress accepts (its default, 100, let slow clients take the API down), and
    # how long a connection may sit without sending (slow headers or bodies) before it is closed.
    http_connection_limit: int = Field(default=2000, gt=0)
    http_channel_timeout_s: int = Field(default=20, gt=0)
    # The embedded mode (`classlens serve` without Redis) runs two supervised workers: one for
    # explanations and registrations, one for audits and analyses, so heavy work never delays an
    # explanation behind it; false runs one worker for every queue.
    embedded_separate_heavy: bool = True

    # Authentication and quotas (service/auth.py, service/quotas.py). API keys, by digest, from a YAML or
    # JSON file and/or the same text in CLASSLENS_API_KEYS; with any key configured (or the API bound off
    # loopback) every route but the probes and the contract needs a bearer key.
    api_keys_file: Path | None = None
    api_keys: str | None = None
    # Requests per key (all routes together), in the `limits` notation ("300/minute", "10/second;1000/hour");
    # a key's own rate_limit replaces it. Counted in Redis when REDIS_URL is set, else in memory.
    rate_limit: str = "300/minute"
    # Jobs a key may have queued or running at once (explanations, audits, analyses, registrations);
    # a key's own max_in_flight replaces it.
    max_jobs_in_flight: int = Field(default=16, ge=1)

    # Monitoring (docs/monitoring.md). Predicted classes are counted by label for the first
    # metrics_max_classes class indices and as "other" beyond, so /metrics stays small for any model.
    metrics_max_classes: int = Field(default=50, ge=1, le=1000)
    # Drift against a model version's reference audit: the last drift_window explanations of each
    # version are kept (bounded) and compared with it, signal by signal, in drift_bins bins cut at the
    # reference's quantiles; no drift is reported before the window holds drift_min_window explanations.
    drift_window: int = Field(default=200, ge=1, le=10_000)
    drift_bins: int = Field(default=10, ge=2, le=50)
    drift_min_window: int = Field(default=50, ge=1)

    @field_validator("model_dirs", mode="before")
    @classmethod
    def _split_paths(cls, value: object) -> object:
        if isinstance(value, str):
            return [Path(p) for p in value.split(os.pathsep) if p]
        return value

    @property
    def user_model_dir(self) -> Path:
        """Where ``classlens models add`` writes unless told otherwise."""
        return self.model_dirs[0] if self.model_dirs else self.data_dir / "models"

    @property
    def upload_dir(self) -> Path:
        """Where POST /v1/models leaves a registration's files for the worker (one folder per job)."""
        return self.data_dir / "uploads"

    @property
    def model_roots(self) -> list[Path]:
        """Store roots in search order; the bundled demo models come last (see Catalog.default)."""
        roots = [*self.model_dirs, self.data_dir / "models"]
        return list(dict.fromkeys(roots))
