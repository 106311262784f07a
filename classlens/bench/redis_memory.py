"""What one cached explanation costs Redis: ``MEMORY USAGE`` of the keys a default explanation leaves.

A private service (:func:`classlens.bench.service.running_service`: its own redis-server, one
worker, the API) explains a few distinct noise images per model with the API's default request,
each through ``POST /v1/explanations`` as a client would. Then each key that explanation left is
read back with ``MEMORY USAGE key SAMPLES 0`` (exact: Redis counts every byte of the value and the
key's own overhead): the result (the cache, ``result:``), the uploaded image (``image:``) and the
job record (``job:``), all three kept for ``CLASSLENS_RESULT_TTL_S``. Their sum is what sizing Redis
needs per explanation kept (docs/deploy.md).

Run with ``python -m classlens.bench.redis_memory`` (``--no-vit-small`` for the bundled model only);
it prints a table and writes ``bench-results/redis_memory.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from classlens.bench.service import Client, noise_pngs, register_random_vit, running_service
from classlens.core import keys
from classlens.core.jobs import sha256_hex
from model_store.catalog import Catalog

BUNDLED_MODEL = "fmnist-vit"
_SEED = 11


def _memory(client: Any, key: str) -> int:
    return int(client.memory_usage(key, samples=0))


def measure(work: Path, images: int = 5, vit_small: bool = True, timeout_s: float = 600.0) -> list[dict[str, Any]]:
    """Per model: the bytes Redis holds for each explanation's result, image and job record (medians, and all)."""
    import redis

    roots: list[Path] = []
    models = [BUNDLED_MODEL]
    if vit_small:
        roots.append(work / "models")
        models.append(register_random_vit(work / "models"))
    catalog = Catalog.default(roots)
    records = []
    with running_service(work, roots, threads=2, http_threads=4) as service:
        store = redis.Redis.from_url(service.redis_url)
        http = Client(service, wait_s=30.0)
        try:
            for model in models:
                entry = catalog.resolve(model)
                sizes: dict[str, list[int]] = {"result": [], "image": [], "job": [], "result_json": []}
                for png in noise_pngs(entry.manifest.input, images, _SEED):
                    before = set(store.scan_iter(match=keys.RESULT + "*"))
                    job = http.explain(model, png, time.monotonic() + timeout_s)
                    (result_key,) = set(store.scan_iter(match=keys.RESULT + "*")) - before
                    sizes["result"].append(_memory(store, result_key))
                    sizes["result_json"].append(int(store.strlen(result_key)))
                    sizes["image"].append(_memory(store, keys.IMAGE + sha256_hex(png)))
                    sizes["job"].append(_memory(store, keys.JOB + job["id"]))
                medians = {name: int(statistics.median(values)) for name, values in sizes.items()}
                records.append(
                    {
                        "model": entry.reference,
                        "input": f"{entry.manifest.input.height}x{entry.manifest.input.width}",
                        "parameters": job["parameters"],
                        "images": images,
                        "median_bytes": medians | {"total": medians["result"] + medians["image"] + medians["job"]},
                        "bytes": sizes,
                    }
                )
        finally:
            http.close()
    return records


def format_table(records: list[dict[str, Any]]) -> str:
    lines = [
        "| model | input | result | result JSON | image | job record | per explanation |",
        "|---|---|---|---|---|---|---|",
    ]
    for record in records:
        m = record["median_bytes"]
        lines.append(
            f"| `{record['model']}` | {record['input']} | {m['result']:,} B | {m['result_json']:,} B | "
            f"{m['image']:,} B | {m['job']:,} B | **{m['total']:,} B** |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5, help="distinct images per model (medians are reported)")
    parser.add_argument("--no-vit-small", action="store_true", help="only the bundled fmnist-vit")
    parser.add_argument("--out", type=Path, default=Path("bench-results/redis_memory.json"))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="classlens-redis-memory-") as folder:
        records = measure(Path(folder), images=args.images, vit_small=not args.no_vit_small)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(records, indent=2) + "\n")
    print(format_table(records))
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
