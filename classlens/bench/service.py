"""The service benchmark: what the queue, the store and HTTP add to the lens, and what a cache hit costs.

For each model, in one run and on one machine: (1) the raw worker throughput, the same
explanations computed one at a time in this process through :mod:`worker.runtime`; (2) the
service throughput, eight HTTP clients submitting distinct images to a private service (its own
redis-server, one Celery worker, the API) until all are explained, and its ratio to (1); (3) the
latency of answers from the cache, sequentially, as p50 and p99. The ratio is the figure to
compare between runs: on shared cores an absolute rate says little, but both sides of the ratio
see the same machine within a few seconds of each other. Run with ``classlens bench-service``.

Everything stays on 127.0.0.1, every loop is bounded by a count and a deadline, and every process
started here is stopped on the way out, whatever the way out is (an error, Ctrl-C).
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import io
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from classlens.bench.lens import environment
from classlens.core.contract import TERMINAL_STATUSES, ExplainRequest
from classlens.core.images import decode_image
from classlens.core.processes import free_port, stop_process
from model_store.catalog import BUNDLED_ROOT, Catalog, ModelEntry, add_model
from model_store.manifest import InputSpec
from service.model_info import model_info
from service.params import canonical_request
from worker.runtime import LoadedViT, default_device, load

LOOPBACK = "127.0.0.1"
RANDOM_VIT = "vit_small_patch16_224"
RANDOM_VIT_NAME = "vit-small-random"
# Distinct seeds per phase, so that no image of one phase can be a cache hit in another.
_RAW_SEED, _WARMUP_SEED, _SERVICE_SEED, _BATCHED_SEED, _LOADED_SEED = 1, 2, 3, 4, 5


class BenchError(RuntimeError):
    """The benchmark cannot run or a measurement went wrong; the message says what to do."""


@dataclass(frozen=True)
class Plan:
    """How to measure every model (how many images is per model); ``timeout_s`` bounds each phase."""

    cache_hits: int = 200
    clients: int = 8
    # Cross-request batching: the service phase again, on a service whose worker and
    # API batch up to this many jobs (CLASSLENS_BATCH_MAX); 1 skips it.
    batch_max: int = 8
    wait_s: float = 30.0
    timeout_s: float = 900.0


# --- the random ImageNet-sized model -------------------------------------------------------------


def register_random_vit(root: Path, seed: int = 0) -> str:
    """Register a seeded, random-initialised ``vit_small_patch16_224`` (1000 classes) under ``root``.

    No pretrained weights are downloaded: the cost of an explanation depends on the
    architecture, not on what the weights have learnt, and the benchmark must run offline.
    """
    from safetensors.torch import save_file
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    from worker.random_models import random_vit

    model = random_vit(RANDOM_VIT, seed=seed, num_classes=1000)
    staging = root.parent / f".{RANDOM_VIT_NAME}-files"
    staging.mkdir(parents=True, exist_ok=True)
    weights = staging / "weights.safetensors"
    save_file({name: tensor.contiguous() for name, tensor in model.state_dict().items()}, str(weights))
    labels = staging / "labels.txt"
    labels.write_text("".join(f"class {index}\n" for index in range(1000)), encoding="utf-8")
    fields = {
        "name": RANDOM_VIT_NAME,
        "version": "1",
        "description": "random-initialised ViT-S/16 for the service benchmark",
        "framework": "timm",
        "architecture": RANDOM_VIT,
        "model_args": {"num_classes": 1000},
        "input": {"height": 224, "width": 224, "channels": 3, "colour_mode": "RGB"},
        "preprocessing": {
            "resize": (224, 224),
            "interpolation": "bicubic",
            "mean": tuple(IMAGENET_DEFAULT_MEAN),
            "std": tuple(IMAGENET_DEFAULT_STD),
        },
        "provenance": {
            "data": "none (random initialisation)",
            "recipe": "classlens bench-service",
            "seed": seed,
            "date": datetime.now(UTC).date().isoformat(),
            "licence": "MIT",
        },
    }
    entry = add_model(root, fields, weights, labels, overwrite=True)
    shutil.rmtree(staging, ignore_errors=True)
    return entry.reference


# --- images ----------------------------------------------------------------------------------------


def noise_pngs(spec: InputSpec, count: int, seed: int) -> list[bytes]:
    """``count`` different noise images at the model's input size and mode, PNG-encoded (nothing can be cached)."""
    rng = np.random.default_rng(seed)
    shape = (spec.height, spec.width) if spec.channels == 1 else (spec.height, spec.width, 3)
    images = []
    for _ in range(count):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=spec.colour_mode).save(buffer, format="PNG")
        images.append(buffer.getvalue())
    return images


def api_default_request(entry: ModelEntry) -> ExplainRequest:
    """The request the API makes of a bare submission (top 3, last layer, sublayers), by the API's own code."""
    return canonical_request({}, entry.labels(), model_info(entry.manifest))


# --- the private service ---------------------------------------------------------------------------


def _tail(log: Path, chars: int = 3000) -> str:
    try:
        return log.read_text(encoding="utf-8", errors="replace")[-chars:]
    except OSError:
        return "(no log)"


@dataclass
class Service:
    """The running service: where the API answers, and the logs."""

    host: str
    port: int
    redis_url: str = ""
    logs: dict[str, Path] = field(default_factory=dict)
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def check_alive(self) -> None:
        for name, process in self.processes.items():
            if process.poll() is not None:
                raise BenchError(f"the {name} exited with {process.returncode}:\n{_tail(self.logs[name])}")


def _spawn(
    service: Service, name: str, command: list[str], env: dict[str, str], work: Path, stack: contextlib.ExitStack
) -> None:
    """Start one part in its own session (a terminal's Ctrl-C reaches only us; we stop it in order)."""
    log = work / f"{name}.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            command, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
    service.logs[name], service.processes[name] = log, process
    stack.callback(stop_process, process, 30.0)


def _get(host: str, port: int, path: str, timeout: float = 5.0) -> int:
    connection = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        connection.request("GET", path)
        return connection.getresponse().status
    finally:
        connection.close()


def _wait_until_ready(service: Service, redis_port: int, timeout_s: float) -> None:
    """redis answers PING, then ``/readyz`` says yes (store, catalog and a fresh worker heartbeat)."""
    import redis

    deadline = time.monotonic() + timeout_s
    client = redis.Redis(host=LOOPBACK, port=redis_port)
    while True:
        service.check_alive()
        with contextlib.suppress(redis.ConnectionError, OSError):
            if client.ping() and _get(service.host, service.port, "/readyz") == 200:
                return
        if time.monotonic() > deadline:
            worker = _tail(service.logs["worker"], 1500)
            raise BenchError(f"the service was not ready after {timeout_s:.0f} s; worker log:\n{worker}")
        time.sleep(0.2)


@contextlib.contextmanager
def running_service(
    work: Path, model_roots: Sequence[Path], threads: int, http_threads: int, batch_max: int = 1
) -> Iterator[Service]:
    """redis-server, one ``classlens worker`` (solo pool, queue gpu) and ``classlens serve``, all on loopback.

    ``batch_max`` > 1 turns on cross-request batching in both (they read the same setting).

    The children get their own data dir under ``work`` and both Redis variables (the
    prefixed one wins in Settings, so a user's CLASSLENS_REDIS_URL must not leak in).
    """
    binary = shutil.which("redis-server")
    if binary is None:
        raise BenchError(
            "redis-server is not installed; the service benchmark needs it (Debian: apt install redis-server)"
        )
    redis_port, api_port = free_port(), free_port()
    url = f"redis://{LOOPBACK}:{redis_port}/0"
    env = {
        **os.environ,
        "REDIS_URL": url,
        "CLASSLENS_REDIS_URL": url,
        "CLASSLENS_MODEL_DIRS": os.pathsep.join(str(root) for root in model_roots),
        "CLASSLENS_DATA_DIR": str(work / "data"),
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "CLASSLENS_BATCH_MAX": str(batch_max),
    }
    cli = [sys.executable, "-m", "classlens.cli"]
    service = Service(LOOPBACK, api_port, url)
    with contextlib.ExitStack() as stack:
        redis_args = ["--port", str(redis_port), "--bind", LOOPBACK, "--save", "", "--appendonly", "no"]
        _spawn(service, "redis-server", [binary, *redis_args], env, work, stack)
        worker_args = ["worker", "--queues=gpu", "--pool=solo", "--concurrency=1", "--loglevel=WARNING"]
        _spawn(service, "worker", [*cli, *worker_args], env, work, stack)
        api_args = ["serve", "--host", LOOPBACK, "--port", str(api_port), "--threads", str(http_threads)]
        _spawn(service, "API", [*cli, *api_args], env, work, stack)
        _wait_until_ready(service, redis_port, timeout_s=180)
        yield service


# --- the HTTP client -------------------------------------------------------------------------------


class Client:
    """One keep-alive connection to the API; a client thread each, so none waits on another's socket."""

    def __init__(self, service: Service, wait_s: float):
        self.service = service
        self.wait_s = wait_s
        self.connection = http.client.HTTPConnection(service.host, service.port, timeout=wait_s + 30)

    def _call(self, method: str, path: str, body: bytes | None = None) -> tuple[int, dict[str, Any]]:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        # A keep-alive connection the server has closed fails once; submissions are idempotent
        # (same content key), so sending again is safe.
        for attempt in (1, 2):
            try:
                self.connection.request(method, path, body=body, headers=headers)
                response = self.connection.getresponse()
                return response.status, json.loads(response.read() or b"{}")
            except (ConnectionError, http.client.RemoteDisconnected, http.client.CannotSendRequest):
                self.connection.close()
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def explain(self, model: str, png: bytes, deadline: float) -> dict[str, Any]:
        """Submit one image and follow its job to the end (or the deadline); the final job record."""
        body = json.dumps({"model": model, "image": base64.b64encode(png).decode()}).encode()
        status, job = self._call("POST", f"/v1/explanations?wait={self.wait_s:g}", body)
        if status not in (200, 202):
            raise BenchError(f"POST /v1/explanations answered {status}: {job.get('detail', job)}")
        while job["status"] not in TERMINAL_STATUSES:
            if time.monotonic() > deadline:
                raise BenchError(f"job {job['id']} was still {job['status']} at the deadline")
            self.service.check_alive()
            status, job = self._call("GET", f"/v1/explanations/{job['id']}?wait={self.wait_s:g}")
            if status != 200 and status != 202:
                raise BenchError(f"GET /v1/explanations/{job.get('id')} answered {status}: {job.get('detail', job)}")
        if job["status"] != "succeeded":
            raise BenchError(f"job {job['id']} {job['status']}: {job.get('error')}")
        return job

    def live(self) -> None:
        """``GET /livez``: the cheapest answer the API gives."""
        status, _ = self._call("GET", "/livez")
        if status != 200:
            raise BenchError(f"GET /livez answered {status}")

    def close(self) -> None:
        self.connection.close()


# --- the three measurements ------------------------------------------------------------------------


def raw_throughput(loaded: LoadedViT, request: ExplainRequest, images: Sequence[bytes]) -> dict[str, Any]:
    """Decode and explain each image alone, as the worker's task does (one warm-up call first, untimed)."""
    [warmup] = noise_pngs(loaded.entry.manifest.input, 1, _WARMUP_SEED)
    loaded.explain([decode_image(warmup)], request)
    seconds = []
    for png in images:
        start = time.perf_counter()
        loaded.explain([decode_image(png)], request)
        seconds.append(time.perf_counter() - start)
    return {
        "images": len(images),
        "seconds": round(sum(seconds), 4),
        "images_per_s": round(len(images) / sum(seconds), 3),
        "median_ms": round(statistics.median(seconds) * 1000, 2),
    }


def bracketing(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """One raw rate from the halves measured before and after the service phase.

    These shared cores drift by 10 % within a minute; raw halves on both sides of the
    service phase cancel a drift that would otherwise land entirely on the ratio.
    """
    images, seconds = before["images"] + after["images"], before["seconds"] + after["seconds"]
    return {
        "images": images,
        "images_per_s": round(images / seconds, 3),
        "before_images_per_s": before["images_per_s"],
        "after_images_per_s": after["images_per_s"],
        "median_ms": round((before["median_ms"] + after["median_ms"]) / 2, 2),
    }


def warm_up_worker(service: Service, model: str, spec: InputSpec, plan: Plan) -> None:
    """One job before timing: the worker loads a model on its first job, which is not part of its rate."""
    client = Client(service, plan.wait_s)
    try:
        [image] = noise_pngs(spec, 1, _WARMUP_SEED)
        client.explain(model, image, time.monotonic() + plan.timeout_s)
    finally:
        client.close()


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of one process so far (Linux ``/proc``; its threads included)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _cpu_by_process(service: Service) -> dict[str, float]:
    """CPU seconds so far of each part of the service, and of this process (the clients)."""
    used = resource.getrusage(resource.RUSAGE_SELF)
    return {
        **{name: _cpu_s(process.pid) for name, process in service.processes.items()},
        "clients": used.ru_utime + used.ru_stime,
    }


def service_throughput(service: Service, model: str, images: Sequence[bytes], plan: Plan) -> dict[str, Any]:
    """``plan.clients`` threads submit the images (each taken once) until all are explained.

    Beside the rate it reports where the per-job CPU went: milliseconds of CPU per job of the
    API, the worker, redis-server and the client threads of this process, read from the
    processes' own counters before and after the phase.
    """
    deadline = time.monotonic() + plan.timeout_s
    pending = iter(images)
    lock = threading.Lock()
    latencies: list[float] = []
    batch_sizes: list[int] = []
    errors: list[BaseException] = []
    start_line = threading.Barrier(plan.clients + 1)

    def client_loop() -> None:
        client = Client(service, plan.wait_s)
        try:
            start_line.wait()
            while not errors:
                with lock:
                    png = next(pending, None)
                if png is None:
                    return
                started = time.perf_counter()
                job = client.explain(model, png, deadline)
                with lock:
                    latencies.append(time.perf_counter() - started)
                    batch_sizes.append(int(job.get("batch_size") or 1))
        except BaseException as error:  # reported below; the other clients stop at their next image
            errors.append(error)
        finally:
            client.close()

    threads = [threading.Thread(target=client_loop, name=f"bench-client-{i}", daemon=True) for i in range(plan.clients)]
    for thread in threads:
        thread.start()
    start_line.wait()
    started, cpu_before = time.perf_counter(), _cpu_by_process(service)
    for thread in threads:
        thread.join(max(deadline - time.monotonic(), 0) + plan.wait_s + 35)
    elapsed, cpu_after = time.perf_counter() - started, _cpu_by_process(service)
    if errors:
        raise BenchError(f"a client failed: {errors[0]}") from errors[0]
    if any(thread.is_alive() for thread in threads) or len(latencies) != len(images):
        raise BenchError(f"only {len(latencies)} of {len(images)} images were explained within {plan.timeout_s:.0f} s")
    return {
        "images": len(images),
        "clients": plan.clients,
        "images_per_s": round(len(images) / elapsed, 3),
        "p50_ms": round(statistics.median(latencies) * 1000, 2),
        "mean_batch_size": round(statistics.mean(batch_sizes), 2),
        "cpu_ms_per_job": {
            name: round((cpu_after[name] - cpu_before[name]) * 1000 / len(images), 2) for name in cpu_before
        },
    }


def cache_hit_latency(
    service: Service, model: str, cached: Sequence[bytes], plan: Plan, busy: threading.Event | None = None
) -> dict[str, Any]:
    """Submit already-explained images again, one after another: every answer must be a 200 from the cache.

    With ``busy``, only while it is set: the hits timed while other clients keep the service working.
    Without it, each hit is followed by a ``GET /livez`` on the same connection: the HTTP stack's
    own round trip on this machine (``server_floor``), what no cache hit can go below.
    """
    deadline = time.monotonic() + plan.timeout_s
    client = Client(service, plan.wait_s)
    seconds: list[float] = []
    floor: list[float] = []
    try:
        for index in range(plan.cache_hits):
            if busy is not None and not busy.is_set():
                break
            if time.monotonic() > deadline:
                raise BenchError(f"only {index} of {plan.cache_hits} cache hits within {plan.timeout_s:.0f} s")
            started = time.perf_counter()
            job = client.explain(model, cached[index % len(cached)], deadline)
            seconds.append(time.perf_counter() - started)
            if not job.get("cached"):
                raise BenchError(f"job {job['id']} was not answered from the cache")
            if busy is None:
                started = time.perf_counter()
                client.live()
                floor.append(time.perf_counter() - started)
    finally:
        client.close()
    if not seconds:
        raise BenchError("no cache hit could be timed while the other clients kept the service busy")
    return {"requests": len(seconds), **_latency(seconds)} | ({"server_floor": _latency(floor)} if floor else {})


def _latency(seconds: Sequence[float]) -> dict[str, float]:
    return {
        "p50_ms": round(statistics.median(seconds) * 1000, 2),
        "p99_ms": round(_percentile(seconds, 99) * 1000, 2),
    }


def cache_hits_under_load(
    service: Service, model: str, cached: Sequence[bytes], fresh: Sequence[bytes], plan: Plan
) -> dict[str, Any]:
    """Cache-hit latency while ``plan.clients`` clients submit the ``fresh`` images: a hit on a busy service."""
    busy, failures = threading.Event(), []

    def load() -> None:
        try:
            service_throughput(service, model, fresh, plan)
        except BaseException as error:  # re-raised below, in the measuring thread
            failures.append(error)
        finally:
            busy.clear()

    busy.set()
    loader = threading.Thread(target=load, name="bench-load", daemon=True)
    loader.start()
    hits = cache_hit_latency(service, model, cached, plan, busy)
    loader.join(plan.timeout_s + plan.wait_s + 35)
    if failures:
        raise BenchError(f"the load beside the cache hits failed: {failures[0]}") from failures[0]
    return {**hits, "clients_beside": plan.clients}


def _percentile(values: Sequence[float], percent: int) -> float:
    """Linear interpolation between order statistics (within the observed range, so p50 <= p99 always)."""
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[percent - 1]


# --- one run ---------------------------------------------------------------------------------------


def bench_service(
    catalog: Catalog, models: Sequence[tuple[str, int]], plan: Plan, work: Path, threads: int | None = None
) -> dict[str, Any]:
    """Measure every ``(reference, images)`` against one private service; the JSON record of the run.

    ``threads``: torch threads here and in the worker (default: this process's), equal so
    that the ratio compares like with like. The raw phase of a model runs in two halves,
    before and after its service phase (:func:`bracketing`), never beside it, so the two
    never compete for the cores.
    """
    threads = threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    entries = [(catalog.resolve(reference), count) for reference, count in models]
    device = default_device()
    records = []
    roots = [root for root in catalog.roots if root != BUNDLED_ROOT]  # the children add the bundled root themselves
    with running_service(work, roots, threads, http_threads=max(16, plan.clients + 4)) as service:
        for entry, count in entries:
            spec = entry.manifest.input
            loaded = load(entry, device)
            request = api_default_request(entry)
            raw_images = noise_pngs(spec, count, _RAW_SEED)
            before = raw_throughput(loaded, request, raw_images[: (count + 1) // 2])
            warm_up_worker(service, entry.reference, spec, plan)
            images = noise_pngs(spec, count, _SERVICE_SEED)
            served = service_throughput(service, entry.reference, images, plan)
            raw = bracketing(before, raw_throughput(loaded, request, raw_images[(count + 1) // 2 :] or raw_images))
            del loaded  # the worker holds its own copy; this one would only take memory
            served["ratio_to_raw"] = round(served["images_per_s"] / raw["images_per_s"], 3)
            hits = cache_hit_latency(service, entry.reference, images, plan)
            hits_loaded = cache_hits_under_load(
                service, entry.reference, images, noise_pngs(spec, max(count, 2 * plan.cache_hits), _LOADED_SEED), plan
            )
            records.append(
                {
                    "model": entry.reference,
                    "input": f"{spec.height}x{spec.width} {spec.colour_mode}",
                    "raw": raw,
                    "service": served,
                    "cache_hits": hits,
                    "cache_hits_under_load": hits_loaded,
                }
            )
    if plan.batch_max > 1:
        _batched_phase(work / "batched", roots, threads, entries, records, plan)
    env = {
        **environment(),
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "worker_torch_threads": threads,
        "device": str(device),
        "worker": "one classlens worker, solo pool, queue gpu",
        "batch_max": plan.batch_max,
        "api": "classlens serve (waitress) with Redis",
    }
    return {"environment": env, "service": records}


def _batched_phase(
    work: Path,
    roots: Sequence[Path],
    threads: int,
    entries: Sequence[tuple[ModelEntry, int]],
    records: list[dict[str, Any]],
    plan: Plan,
) -> None:
    """The service phase once more, against a service that batches across requests; ``gain`` is the
    ratio of its throughput to the unbatched service's, measured minutes apart on the same machine."""
    work.mkdir(parents=True, exist_ok=True)
    with running_service(
        work, roots, threads, http_threads=max(16, plan.clients + 4), batch_max=plan.batch_max
    ) as service:
        for record, (entry, count) in zip(records, entries, strict=True):
            spec = entry.manifest.input
            warm_up_worker(service, entry.reference, spec, plan)
            batched = service_throughput(service, entry.reference, noise_pngs(spec, count, _BATCHED_SEED), plan)
            batched["gain"] = round(batched["images_per_s"] / record["service"]["images_per_s"], 3)
            batched["ratio_to_raw"] = round(batched["images_per_s"] / record["raw"]["images_per_s"], 3)
            record["batched"] = batched


def format_table(records: Sequence[dict[str, Any]]) -> str:
    """Per model: raw, the service unbatched and batched (the default), CPU per job by process; cache hits."""
    parts = ("API", "worker", "redis-server", "clients")
    lines = [
        f"{'model':<24} {'phase':<22} {'img/s':>8} {'/ raw':>6} {'mean batch':>10} "
        + " ".join(f"{part + ' ms':>15}" for part in parts)
    ]
    for record in records:
        lines.append(f"{record['model']:<24} {'raw, one at a time':<22} {record['raw']['images_per_s']:>8.2f}")
        phases = [("service, batch 1", record["service"])]
        if "batched" in record:
            phases.append(("service, batched", record["batched"]))
        for name, phase in phases:
            cpu = phase["cpu_ms_per_job"]
            lines.append(
                f"{'':<24} {name:<22} {phase['images_per_s']:>8.2f} {phase['ratio_to_raw']:>6.2f} "
                f"{phase['mean_batch_size']:>10.2f} " + " ".join(f"{cpu.get(part, 0.0):>15.2f}" for part in parts)
            )
        quiet, loaded = record["cache_hits"], record.get("cache_hits_under_load")
        hits = f"cache hit p50 {quiet['p50_ms']:.1f} ms, p99 {quiet['p99_ms']:.1f} ms quiet"
        if "server_floor" in quiet:
            floor = quiet["server_floor"]
            hits += f" (GET /livez p50 {floor['p50_ms']:.1f} ms, p99 {floor['p99_ms']:.1f} ms)"
        if loaded:
            beside = loaded["clients_beside"]
            hits += f"; p50 {loaded['p50_ms']:.1f} ms, p99 {loaded['p99_ms']:.1f} ms beside {beside} clients"
        lines.append(f"{'':<24} {hits}")
    return "\n".join(lines)
