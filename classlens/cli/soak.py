"""``classlens soak``: clients for minutes against a private service while its workers are killed and Redis restarts.

The service promises that every accepted job ends ``succeeded`` or ``failed``, exactly once, and
that no request gets a 5xx but the documented 503s of an outage it cannot ride through. A soak is
how that promise is checked at length, with every part real: its own redis-server (append-only
file, fsync on every write, so a ``kill -9`` of Redis loses nothing it acknowledged),
``--workers`` solo-pool ``classlens worker`` processes and ``classlens serve``, all on 127.0.0.1.

Clients submit distinct noise images (new work), images submitted before (cache hits and joins)
and malformed requests (which must be 4xx), each following its job with long polls as a production
caller would. Faults are spread over the run: a worker is killed with SIGKILL and started again two
seconds later (as an orchestrator would), Redis is killed with SIGKILL and started again at once.
After the last minute every accepted job gets up to ``--drain`` seconds to finish; then each is
read back through the API:

- ``lost``: accepted, then unknown to the API (404);
- ``stuck``: accepted and still not finished after the drain;
- ``run twice``: finishes the workers counted beyond one per job that needed work.

Not part of ``make test`` (it runs for minutes); its figures are in docs/benchmarks.md.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from classlens.cli.common import open_catalog, resolve
from classlens.core.contract import TERMINAL_STATUSES
from classlens.core.processes import free_port, stop_process
from classlens.core.settings import Settings

LOOPBACK = "127.0.0.1"
# Shares of the clients' requests; the rest submit a new image.
REPEAT_SHARE, MALFORMED_SHARE = 0.2, 0.1
WORKER_RESTART_DELAY_S = 2.0


def _rss_kib(pid: int) -> int | None:
    """Resident memory of ``pid`` in KiB (Linux), or None when it cannot be read."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


class Deployment:
    """The private service: redis-server, the workers and the API, each a child process with its own log."""

    def __init__(self, work: Path, model_roots: list[Path], workers: int, batch_max: int, http_threads: int):
        binary = shutil.which("redis-server")
        if binary is None:
            raise click.ClickException("redis-server is not installed (Debian: apt install redis-server)")
        self.work, self.redis_binary = work, binary
        self.redis_port, self.api_port = free_port(), free_port()
        self.url = f"redis://{LOOPBACK}:{self.redis_port}/0"
        self.env = {
            **os.environ,
            "REDIS_URL": self.url,
            "CLASSLENS_REDIS_URL": self.url,
            "CLASSLENS_MODEL_DIRS": os.pathsep.join(str(root) for root in model_roots),
            "CLASSLENS_DATA_DIR": str(work / "data"),
            "CLASSLENS_BATCH_MAX": str(batch_max),
            "OMP_NUM_THREADS": "1",
        }
        self.http_threads = http_threads
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.first_rss: dict[str, int | None] = {}
        self.worker_names = [f"worker-{n}" for n in range(1, workers + 1)]

    def _spawn(self, name: str, command: list[str]) -> None:
        with (self.work / f"{name}.log").open("ab") as out:
            self.processes[name] = subprocess.Popen(
                command, env=self.env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )

    def start_redis(self) -> None:
        folder = self.work / "redis"
        folder.mkdir(exist_ok=True)
        options = ["--port", str(self.redis_port), "--bind", LOOPBACK, "--dir", str(folder), "--save", ""]
        self._spawn("redis", [self.redis_binary, *options, "--appendonly", "yes", "--appendfsync", "always"])

    def start_worker(self, name: str) -> None:
        queues = "--queues=gpu,models"
        self._spawn(name, [sys.executable, "-m", "classlens.cli", "worker", queues, f"--hostname={name}@%h"])

    def start_heavy_worker(self) -> None:
        """The worker for audits and analyses, started late: until then an audit stays queued (see :func:`abuse`)."""
        name = "worker-heavy"
        self._spawn(
            name, [sys.executable, "-m", "classlens.cli", "worker", "--queues=audits,analyses", f"--hostname={name}@%h"]
        )

    def start(self) -> None:
        self.start_redis()
        for name in self.worker_names:
            self.start_worker(name)
        serve = ["serve", "--host", LOOPBACK, "--port", str(self.api_port), "--threads", str(self.http_threads)]
        self._spawn("api", [sys.executable, "-m", "classlens.cli", *serve])

    def wait_ready(self, timeout_s: float = 180) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            for name, process in self.processes.items():
                if process.poll() is not None:
                    raise click.ClickException(f"{name} exited with {process.returncode}; see {self.work / name}.log")
            with contextlib.suppress(OSError, http.client.HTTPException):
                if call(self.api_port, "GET", "/readyz")[0] == 200:
                    self.first_rss = self.rss()
                    return
            if time.monotonic() > deadline:
                raise click.ClickException(f"the service was not ready after {timeout_s:.0f} s")
            time.sleep(0.5)

    def kill_worker(self, name: str) -> None:
        os.kill(self.processes[name].pid, signal.SIGKILL)
        self.processes[name].wait()
        time.sleep(WORKER_RESTART_DELAY_S)
        self.start_worker(name)

    def restart_redis(self) -> None:
        os.kill(self.processes["redis"].pid, signal.SIGKILL)
        self.processes["redis"].wait()
        self.start_redis()

    def rss(self) -> dict[str, int | None]:
        return {name: _rss_kib(process.pid) for name, process in self.processes.items()}

    def finishes(self, model: str) -> int:
        """Jobs of ``model`` the workers counted as finished (succeeded or failed)."""
        import redis

        from classlens.core.stats import STATUSES, jobs_key

        client = redis.Redis.from_url(self.url)
        counters = [jobs_key("explanation", model, status) for status in STATUSES]
        return sum(int(value or 0) for value in client.mget(counters))

    def stop(self) -> None:
        for name in ["api", *self.worker_names, "worker-heavy", "redis"]:
            if name in self.processes:
                stop_process(self.processes[name], 30.0)


def call(port: int, method: str, path: str, body: bytes | None = None, timeout: float = 60.0) -> tuple[int, Any, dict]:
    """One request on a fresh connection: status, the decoded JSON body (or None) and the headers."""
    connection = http.client.HTTPConnection(LOOPBACK, port, timeout=timeout)
    try:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        raw = response.read()
        try:
            payload = json.loads(raw) if raw else None
        except ValueError:
            payload = None
        return response.status, payload, dict(response.getheaders())
    finally:
        connection.close()


def noise_png(width: int, height: int, mode: str, rng: random.Random) -> bytes:
    """A PNG of random pixels at the model's input size: new work every time (nothing to find in the cache)."""
    from PIL import Image

    bands = 1 if mode == "L" else 3
    image = Image.frombytes(mode if mode == "L" else "RGB", (width, height), rng.randbytes(width * height * bands))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass
class Tally:
    """What every client saw, under one lock."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    statuses: Counter[int] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    accepted: set[str] = field(default_factory=set)
    new_jobs: set[str] = field(default_factory=set)
    malformed_refused: int = 0
    malformed_accepted: int = 0
    submit_ms: list[float] = field(default_factory=list)
    done_ms: list[float] = field(default_factory=list)

    def request(self, status: int) -> None:
        with self.lock:
            self.statuses[status] += 1


@dataclass(frozen=True)
class Plan:
    model: str
    input: tuple[int, int, str]  # width, height, colour mode
    minutes: float
    clients: int
    poll_s: float = 20.0


def _client(port: int, plan: Plan, end: float, tally: Tally, seed: int) -> None:
    """Submit until ``end``; follow each accepted job to its end (or give up on it at ``end`` + 60 s)."""
    rng = random.Random(seed)
    seen: list[bytes] = []
    width, height, mode = plan.input
    while time.monotonic() < end:
        try:
            draw = rng.random()
            body: dict[str, Any]
            if draw < MALFORMED_SHARE:
                body = {"model": plan.model, "image": "not base64 at all!", "targets": [2.5]}
            else:
                repeat = seen and draw < MALFORMED_SHARE + REPEAT_SHARE
                png = rng.choice(seen) if repeat else noise_png(width, height, mode, rng)
                seen.append(png)
                body = {"model": plan.model, "image": base64.b64encode(png).decode(), "top_k": 2}
            started = time.monotonic()
            status, job, headers = call(port, "POST", "/v1/explanations", json.dumps(body).encode())
            tally.request(status)
            if draw < MALFORMED_SHARE:
                with tally.lock:
                    if 400 <= status < 500:
                        tally.malformed_refused += 1
                    elif status < 400:
                        tally.malformed_accepted += 1
                continue
            if status >= 500:
                time.sleep(float(headers.get("Retry-After", 1)))
                continue
            if status not in (200, 202) or not isinstance(job, dict):
                continue
            with tally.lock:
                tally.submit_ms.append((time.monotonic() - started) * 1000)
                tally.accepted.add(job["id"])
                if not job.get("cached"):
                    tally.new_jobs.add(job["id"])
            _follow(port, plan, job, started, end + 60, tally)
        except (OSError, http.client.HTTPException) as error:
            with tally.lock:
                tally.errors[type(error).__name__] += 1
            time.sleep(0.5)


def _follow(port: int, plan: Plan, job: dict[str, Any], started: float, give_up: float, tally: Tally) -> None:
    while job["status"] not in TERMINAL_STATUSES and time.monotonic() < give_up:
        status, found, headers = call(port, "GET", f"/v1/explanations/{job['id']}?wait={plan.poll_s:g}")
        tally.request(status)
        if status == 200 and isinstance(found, dict):
            job = found
        elif status >= 500:
            time.sleep(float(headers.get("Retry-After", 1)))
        else:
            return  # 404 and others: counted as lost or stuck at the end
    if job["status"] in TERMINAL_STATUSES:
        with tally.lock:
            tally.done_ms.append((time.monotonic() - started) * 1000)


def _faults(plan: Plan, worker_kills: int, redis_restarts: int) -> list[tuple[float, str]]:
    """When each fault happens (seconds from the start), spread evenly over the middle 80 % of the run."""
    # Each kind spread evenly on its own, then merged: Redis restarts fall between worker kills.
    placed = [((n + 0.5) / worker_kills, 0, "worker") for n in range(worker_kills)]
    placed += [((n + 1) / (redis_restarts + 1), 1, "redis") for n in range(redis_restarts)]
    kinds = [kind for _, _, kind in sorted(placed)]
    span = plan.minutes * 60
    return [(span * (0.1 + 0.8 * (n + 0.5) / len(kinds)), kind) for n, kind in enumerate(kinds)] if kinds else []


def _percentile(values: list[float], share: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(share * len(ordered)))], 1)


def soak(deployment: Deployment, plan: Plan, worker_kills: int, redis_restarts: int, drain_s: float) -> dict[str, Any]:
    """Run the clients and the faults, drain, read every accepted job back; the report."""
    tally = Tally()
    finished_before = deployment.finishes(plan.model)
    began = time.monotonic()
    end = began + plan.minutes * 60
    clients = [
        threading.Thread(target=_client, args=(deployment.api_port, plan, end, tally, seed), daemon=True)
        for seed in range(plan.clients)
    ]
    for thread in clients:
        thread.start()
    faults_done: list[dict[str, Any]] = []
    for n, (at_s, kind) in enumerate(_faults(plan, worker_kills, redis_restarts)):
        time.sleep(max(0.0, began + at_s - time.monotonic()))
        if kind == "worker":
            name = deployment.worker_names[n % len(deployment.worker_names)]
            click.echo(f"[{time.monotonic() - began:6.0f} s] kill -9 {name}", err=True)
            deployment.kill_worker(name)
        else:
            click.echo(f"[{time.monotonic() - began:6.0f} s] kill -9 redis-server, start it again", err=True)
            deployment.restart_redis()
        faults_done.append({"at_s": round(time.monotonic() - began, 1), "fault": kind})
    time.sleep(max(0.0, end - time.monotonic()))
    click.echo(f"[{time.monotonic() - began:6.0f} s] clients stop; draining up to {drain_s:.0f} s", err=True)
    for thread in clients:
        thread.join(drain_s + 90)
    final = _read_back(deployment.api_port, sorted(tally.accepted), time.monotonic() + drain_s)
    outcome = Counter(final.values())
    rss_end = deployment.rss()
    return {
        "plan": {
            "model": plan.model,
            "minutes": plan.minutes,
            "clients": plan.clients,
            "workers": len(deployment.worker_names),
            "faults": faults_done,
        },
        "requests": sum(tally.statuses.values()),
        "statuses": {str(status): count for status, count in sorted(tally.statuses.items())},
        "server_errors": sum(count for status, count in tally.statuses.items() if status >= 500),
        "client_errors": dict(tally.errors),
        "malformed": {"refused_4xx": tally.malformed_refused, "accepted": tally.malformed_accepted},
        "accepted": len(tally.accepted),
        "succeeded": outcome["succeeded"],
        "failed": outcome["failed"],
        "lost": outcome["lost"],
        "stuck": outcome["queued"] + outcome["running"],
        "run_twice": max(0, deployment.finishes(plan.model) - finished_before - len(tally.new_jobs)),
        "submit_ms": {"p50": _percentile(tally.submit_ms, 0.5), "p99": _percentile(tally.submit_ms, 0.99)},
        "done_ms": {"p50": _percentile(tally.done_ms, 0.5), "p99": _percentile(tally.done_ms, 0.99)},
        "rss_kib": {name: {"start": deployment.first_rss.get(name), "end": rss_end.get(name)} for name in rss_end},
    }


def _timed(port: int, method: str, path: str, body: bytes | None = None) -> tuple[int, float]:
    started = time.perf_counter()
    status, _, _ = call(port, method, path, body, timeout=30)
    return status, (time.perf_counter() - started) * 1000


def _latencies(port: int, cache_hit: bytes, rounds: int) -> dict[str, Any]:
    """``/livez`` and a cache-hit submission, ``rounds`` times each, interleaved: statuses and p50/p99/max in ms."""
    figures: dict[str, list[float]] = {"livez": [], "cache_hit": []}
    statuses: Counter[str] = Counter()
    for _ in range(rounds):
        for name, (method, path, body) in {
            "livez": ("GET", "/livez", None),
            "cache_hit": ("POST", "/v1/explanations", cache_hit),
        }.items():
            status, ms = _timed(port, method, path, body)
            statuses[f"{name} {status}"] += 1
            figures[name].append(ms)
    summary: dict[str, Any] = {"statuses": dict(statuses)}
    for name, values in figures.items():
        summary[name] = {
            "p50": _percentile(values, 0.5),
            "p99": _percentile(values, 0.99),
            "max": round(max(values), 1),
        }
    return summary


def abuse(deployment: Deployment, plan: Plan, slow_connections: int, long_polls: int) -> dict[str, Any]:
    """``/livez`` and a cache hit, timed quiet and then under ``slow_connections`` and ``long_polls``.

    A slow connection sends half a request line and nothing more; a long poll waits on an audit
    that no worker runs yet (the audit worker starts afterwards) and polls again as soon as it is
    answered early. The service promises both stay answered within 100 ms.
    """
    import socket

    port = deployment.api_port
    width, height, mode = plan.input
    image = base64.b64encode(noise_png(width, height, mode, random.Random("abuse"))).decode()
    cache_hit = json.dumps({"model": plan.model, "image": image, "top_k": 2}).encode()
    status, job, _ = call(port, "POST", "/v1/explanations?wait=30", cache_hit)
    if status != 200 or not isinstance(job, dict) or job["status"] != "succeeded":
        raise click.ClickException(f"the first explanation did not succeed: {status} {job}")
    audit_body = json.dumps({"model": plan.model, "images": [{"image": image}]}).encode()
    status, audit, _ = call(port, "POST", "/v1/audits", audit_body)
    if status != 202 or not isinstance(audit, dict):
        raise click.ClickException(f"the audit was not accepted: {status} {audit}")
    quiet = _latencies(port, cache_hit, 40)
    stop = threading.Event()

    def poll() -> None:
        # A poll answered before its wait is over (every long-poll slot was taken) is made again a
        # second later, as a client with a one-second poll interval does; one that never pauses is a
        # flood, which the per-key rate limit is for.
        while not stop.is_set():
            started = time.monotonic()
            with contextlib.suppress(OSError, http.client.HTTPException):
                call(port, "GET", f"/v1/audits/{audit['id']}?wait=30", timeout=60)
            stop.wait(max(0.0, 1.0 - (time.monotonic() - started)))

    pollers = [threading.Thread(target=poll, daemon=True) for _ in range(long_polls)]
    for thread in pollers:
        thread.start()
    sockets = []
    try:
        for _ in range(slow_connections):
            slow = socket.create_connection((LOOPBACK, port), timeout=10)
            slow.sendall(b"GET /v1/models HTTP/1.1\r\nHost: classlens\r\n")  # and never the blank line
            sockets.append(slow)
        time.sleep(1.0)  # every poller is waiting
        abused = _latencies(port, cache_hit, 40)
    finally:
        stop.set()
        for slow in sockets:
            slow.close()
    for thread in pollers:
        thread.join(60)
    deployment.start_heavy_worker()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        status, audit, _ = call(port, "GET", f"/v1/audits/{audit['id']}?wait=10")
        if status == 200 and audit["status"] in TERMINAL_STATUSES:
            break
    return {
        "slow_connections": slow_connections,
        "long_polls": long_polls,
        "quiet": quiet,
        "abused": abused,
        "audit_after": audit["status"] if isinstance(audit, dict) else status,
    }


def _read_back(port: int, job_ids: list[str], deadline: float) -> dict[str, str]:
    """Each job's status through the API once all are finished or at ``deadline``; ``lost`` for a 404."""
    final: dict[str, str] = {}
    pending = list(job_ids)
    while pending:
        still = []
        for job_id in pending:
            status, job, _ = call(port, "GET", f"/v1/explanations/{job_id}")
            if status == 404:
                final[job_id] = "lost"
            elif status == 200 and isinstance(job, dict) and job["status"] in TERMINAL_STATUSES:
                final[job_id] = job["status"]
            else:
                final[job_id] = job["status"] if isinstance(job, dict) and "status" in job else "queued"
                still.append(job_id)
        if not still or time.monotonic() > deadline:
            return final
        pending = still
        time.sleep(2)
    return final


def format_report(report: dict[str, Any]) -> str:
    rss = ", ".join(
        f"{name} {(figures['start'] or 0) // 1024}->{(figures['end'] or 0) // 1024} MiB"
        for name, figures in report["rss_kib"].items()
    )
    lines = [
        f"requests {report['requests']}  statuses {report['statuses']}  5xx {report['server_errors']}",
        f"malformed refused 4xx {report['malformed']['refused_4xx']}, accepted {report['malformed']['accepted']}",
        f"accepted {report['accepted']}  succeeded {report['succeeded']}  failed {report['failed']}",
        f"lost {report['lost']}  stuck {report['stuck']}  run twice {report['run_twice']}",
        f"submit p50/p99 {report['submit_ms']['p50']}/{report['submit_ms']['p99']} ms;"
        f" submit to done p50/p99 {report['done_ms']['p50']}/{report['done_ms']['p99']} ms",
        f"RSS {rss}",
    ]
    return "\n".join(lines)


def format_abuse(held: dict[str, Any]) -> str:
    lines = [f"{held['slow_connections']} slow connections, {held['long_polls']} long polls (p50/p99/max ms):"]
    for phase in ("quiet", "abused"):
        figures = held[phase]
        cells = [
            f"{name} {figures[name]['p50']}/{figures[name]['p99']}/{figures[name]['max']}"
            for name in ("livez", "cache_hit")
        ]
        lines.append(f"  {phase:7s} {'  '.join(cells)}  {figures['statuses']}")
    return "\n".join(lines)


@contextlib.contextmanager
def _deployed(deployment: Deployment) -> Iterator[Deployment]:
    def _exit(*_: object) -> None:
        sys.exit(128 + signal.SIGTERM)

    previous = signal.signal(signal.SIGTERM, _exit)
    try:
        deployment.start()
        deployment.wait_ready()
        yield deployment
    finally:
        deployment.stop()
        signal.signal(signal.SIGTERM, previous)


@click.command("soak")
@click.option("--model", default="fmnist-vit", show_default=True, help="Registered model to explain.")
@click.option("--minutes", default=10.0, show_default=True, type=click.FloatRange(0.1, 24 * 60))
@click.option("--clients", default=8, show_default=True, type=click.IntRange(1, 256))
@click.option("--workers", default=2, show_default=True, type=click.IntRange(1, 16))
@click.option("--worker-kills", default=3, show_default=True, type=click.IntRange(0, 1000))
@click.option("--redis-restarts", default=1, show_default=True, type=click.IntRange(0, 1000))
@click.option("--batch-max", default=4, show_default=True, type=click.IntRange(1, 64))
@click.option("--drain", default=120.0, show_default=True, type=click.FloatRange(1), help="Seconds for jobs to finish.")
@click.option("--slow-connections", default=500, show_default=True, type=click.IntRange(0, 5000))
@click.option("--long-polls", default=50, show_default=True, type=click.IntRange(0, 1000))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=Path("bench-results/soak.json"))
@click.pass_obj
def soak_command(
    settings: Settings,
    model: str,
    minutes: float,
    clients: int,
    workers: int,
    worker_kills: int,
    redis_restarts: int,
    batch_max: int,
    drain: float,
    slow_connections: int,
    long_polls: int,
    out: Path,
) -> None:
    """Clients for MINUTES against a private service (its own Redis, workers, API) with faults; a report.

    First, ``/livez`` and a cache hit are timed quiet and under SLOW_CONNECTIONS and LONG_POLLS.

    Exits with status 1 when a job was lost, stuck or run twice, or a request got a 5xx.
    """
    entry = resolve(open_catalog(settings), model)
    spec = entry.manifest.input
    plan = Plan(entry.reference, (spec.width, spec.height, spec.colour_mode), minutes, clients)
    with tempfile.TemporaryDirectory(prefix="classlens-soak-") as temporary:
        deployment = Deployment(Path(temporary), settings.model_roots, workers, batch_max, http_threads=clients + 8)
        with _deployed(deployment):
            click.echo(f"soak: {clients} clients, {workers} workers, {minutes:g} min on {entry.reference}", err=True)
            held = abuse(deployment, plan, slow_connections, long_polls)
            click.echo(format_abuse(held))
            report = {"abuse": held, **soak(deployment, plan, worker_kills, redis_restarts, drain)}
    click.echo(format_report(report))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    click.echo(f"wrote {out}", err=True)
    if report["lost"] or report["stuck"] or report["run_twice"] or report["server_errors"]:
        sys.exit(1)
