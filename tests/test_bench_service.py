"""``classlens bench-service`` for real, at toy size: its own redis-server, worker and API, then the JSON record.

Only the tiny random ViT of the service fixtures is measured (``--no-vit-small``), with a
handful of images, so the run takes seconds; the figures mean nothing, but every part the
full benchmark uses starts, answers and is stopped.
"""

from __future__ import annotations

import json

from click.testing import CliRunner

from classlens.cli import main
from tests.service_fixtures import TINY_MODEL


def test_bench_service_quick_run_writes_positive_figures(tmp_path, tiny_model_root):
    out = tmp_path / "service.json"
    arguments = ["bench-service", "--no-vit-small", "--model", TINY_MODEL, "--model", "no-such-model"]
    arguments += ["--quick", "--requests", "4", "--cache-hits", "4", "--clients", "2", "--threads", "1"]
    arguments += ["--timeout", "60", "--batch-max", "4", "--out", str(out)]
    env = {
        "CLASSLENS_MODEL_DIRS": str(tiny_model_root),
        "CLASSLENS_DATA_DIR": str(tmp_path / "data"),
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }

    result = CliRunner().invoke(main, arguments, env=env, catch_exceptions=False)

    assert result.exit_code == 0, result.output
    assert "skipping no-such-model" in result.output  # a model that is not registered is skipped, not fatal
    record = json.loads(out.read_text())
    assert record["environment"]["worker_torch_threads"] == 1
    assert record["environment"]["cores"] >= 1
    [figures] = record["service"]
    assert figures["model"] == f"{TINY_MODEL}@1"
    assert figures["raw"]["images"] == figures["service"]["images"] == 4
    assert figures["raw"]["images_per_s"] > 0
    assert figures["service"]["images_per_s"] > 0
    assert figures["service"]["ratio_to_raw"] > 0
    batched = figures["batched"]  # the same phase against a service that batches across requests
    assert batched["images"] == 4
    assert batched["images_per_s"] > 0
    assert batched["gain"] > 0
    assert 1 <= batched["mean_batch_size"] <= 4
    assert figures["service"]["mean_batch_size"] == 1
    assert record["environment"]["batch_max"] == 4
    hits = figures["cache_hits"]
    assert hits["requests"] == 4
    assert 0 < hits["p50_ms"] <= hits["p99_ms"]
    floor = hits["server_floor"]  # GET /livez after each quiet hit: the HTTP stack's own round trip
    assert 0 < floor["p50_ms"] <= floor["p99_ms"]
    assert "server_floor" not in figures["cache_hits_under_load"]
    loaded = figures["cache_hits_under_load"]  # the same hits while 2 clients submit new images
    assert 1 <= loaded["requests"] <= 4
    assert 0 < loaded["p50_ms"] <= loaded["p99_ms"]
    assert loaded["clients_beside"] == 2
    for phase in (figures["service"], batched):  # where each job's CPU went, process by process
        cpu = phase["cpu_ms_per_job"]
        assert set(cpu) == {"API", "worker", "redis-server", "clients"}
        assert cpu["worker"] > 0
        assert cpu["API"] > 0
    assert TINY_MODEL in result.output  # the table
