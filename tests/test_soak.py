"""``classlens soak``: its fault schedule, and a short real run through HTTP with a worker kill and a Redis restart.

The short run is the HTTP-level fault test: clients of the real API, two real workers, a
redis-server killed and started again on its append-only file. The ten-minute run of the
figures in docs/benchmarks.md is the same command with its defaults.
"""

from __future__ import annotations

import json
import subprocess
import sys

from classlens.cli.soak import Plan, _faults, _percentile
from tests.service_fixtures import REPO


def test_faults_are_spread_over_the_middle_of_the_run_and_interleaved():
    plan = Plan("m@1", (28, 28, "L"), minutes=10, clients=1)
    schedule = _faults(plan, worker_kills=3, redis_restarts=1)
    times = [at for at, _ in schedule]
    assert sorted(times) == times
    assert times[0] >= 60
    assert times[-1] <= 540
    assert sorted(kind for _, kind in schedule) == ["redis", "worker", "worker", "worker"]
    assert schedule[0][1] == "worker", "the Redis restart falls between kills"
    assert schedule[-1][1] == "worker", "the Redis restart falls between kills"
    assert _faults(plan, 0, 0) == []


def test_percentiles_of_nothing_and_of_a_few():
    assert _percentile([], 0.5) is None
    assert _percentile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert _percentile([float(n) for n in range(1, 101)], 0.99) == 100.0


def test_a_short_soak_with_a_worker_kill_and_a_redis_restart_loses_nothing(tmp_path):
    out = tmp_path / "soak.json"
    command = [sys.executable, "-m", "classlens.cli", "soak", "--minutes", "0.4", "--clients", "2"]
    command += ["--worker-kills", "1", "--redis-restarts", "1", "--slow-connections", "50", "--long-polls", "10"]
    command += ["--drain", "90", "--out", str(out)]
    run = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads(out.read_text())
    assert [fault["fault"] for fault in report["plan"]["faults"]] == ["worker", "redis"]
    assert report["accepted"] > 0
    assert report["succeeded"] == report["accepted"]
    assert (report["lost"], report["stuck"], report["run_twice"], report["server_errors"]) == (0, 0, 0, 0)
    assert report["malformed"]["accepted"] == 0
    assert report["malformed"]["refused_4xx"] > 0
    assert report["abuse"]["abused"]["statuses"] == {"livez 200": 40, "cache_hit 200": 40}
    assert report["abuse"]["audit_after"] == "succeeded", "the audit long-polled during the abuse finished"
