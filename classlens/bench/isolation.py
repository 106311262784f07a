"""Explanation latency on an embedded ``classlens serve``, alone and behind two 300-image audits.

``python -m classlens.bench.isolation PORT true|false``: starts ``classlens serve`` (no Redis, a fresh
data dir, ``CLASSLENS_EMBEDDED_SEPARATE_HEAVY`` as given), warms ``fmnist-vit``, times 10 explanations
of distinct requests, submits two audits of 300 images, and times 10 more while they run. Prints JSON.
"""

from __future__ import annotations

import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import requests

from model_store.catalog import BUNDLED_SAMPLES

REPO = Path(__file__).resolve().parents[2]
SAMPLES = sorted(str(path) for path in BUNDLED_SAMPLES.glob("*.png"))


def main(port: int, separate: str) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "CLASSLENS_REDIS_URL")}
    env.update(CLASSLENS_DATA_DIR=tempfile.mkdtemp(), CLASSLENS_EMBEDDED_SEPARATE_HEAVY=separate)
    command = [sys.executable, "-m", "classlens.cli", "serve", "--port", str(port)]
    server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    base = f"http://127.0.0.1:{port}"
    count = 0

    def explain() -> float:
        nonlocal count
        count += 1
        image = Path(SAMPLES[count % len(SAMPLES)]).read_bytes()
        fields = {"model": "fmnist-vit", "top_k": str(1 + count // len(SAMPLES) % 5), "layers": str(count % 6)}
        started = time.perf_counter()
        answer = requests.post(f"{base}/v1/explanations?wait=60", files={"image": ("i.png", image)}, data=fields)
        assert answer.json()["status"] == "succeeded", answer.text[:300]
        return time.perf_counter() - started

    def audit(seed: int) -> str:
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as archive:
            for i in range(300):
                archive.writestr(f"{seed}-{i}.png", Path(SAMPLES[i % len(SAMPLES)]).read_bytes())
        answer = requests.post(
            f"{base}/v1/audits",
            files={"archive": ("a.zip", buffer.getvalue())},
            data={"model": "fmnist-vit", "top_k": str(seed)},
        )
        assert answer.status_code == 202, answer.text[:300]
        return str(answer.headers["Location"])

    try:
        for _ in range(240):
            try:
                if requests.get(f"{base}/readyz", timeout=1).status_code == 200:
                    break
            except requests.RequestException:
                pass
            time.sleep(0.5)
        explain()  # the model loads
        alone = [explain() for _ in range(10)]
        audits = [audit(1), audit(2)]
        time.sleep(1.0)
        behind = [explain() for _ in range(10)]
        states = [requests.get(f"{base}{location}").json()["status"] for location in audits]
        figures = {"alone_p50_s": statistics.median(alone), "alone_max_s": max(alone)}
        figures |= {"behind_p50_s": statistics.median(behind), "behind_max_s": max(behind)}
        print(json.dumps({"separate": separate, **figures, "audits_at_end": states}))
    finally:
        server.terminate()
        server.wait(60)


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])
