"""How far minibatch CKA with a ragged last batch lands from the one-batch value, under each batching rule.

``python -m classlens.bench.cka_batches`` prints the table of docs/benchmarks.md ("Minibatch CKA with
a ragged last batch"). For ``m`` images, the layer x layer CKA of one batch of all ``m`` (the debiased
full-data value) is compared with four minibatch estimates: the analyses' batches (``n`` images each,
a last batch of the rest, joined to the one before under 4) summed with equal weights (docs/methods.md,
"Minibatch CKA"), with each batch's HSIC weighted by its size ``n_i``, or by ``n_i (n_i - 3)``; and
``ceil(m / n)`` batches of near-equal size, equal weights. Reported: the largest difference over the
matrix, averaged over image orders (the first order is the images as drawn, the rest are shuffles).

Every batch's HSIC is read from the one-batch Gram's block of its rows: the unbiased HSIC does not
depend on the features' mean, so this equals recomputing the Gram per batch.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

import worker  # noqa: F401  (before any timm import)
from classlens.core import fashion_mnist
from model_store.catalog import BUNDLED_ROOT, Catalog
from worker.analyses.cka import gram, u_centre
from worker.analyses.representations import Representation, describe, reduce, run_layers
from worker.runtime import load

Spans = list[tuple[int, int]]
WEIGHTS: dict[str, Callable[[int], float]] = {
    "equal": lambda n: 1.0,
    "n": lambda n: float(n),
    "n(n-3)": lambda n: float(n * (n - 3)),
}


def analysis_spans(m: int, n: int) -> Spans:
    """The analyses' batches: ``n`` at a time; a last one under 4 joins the one before."""
    spans = [(start, min(start + n, m)) for start in range(0, m, n)]
    if len(spans) > 1 and spans[-1][1] - spans[-1][0] < 4:
        spans[-2:] = [(spans[-2][0], m)]
    return spans


def near_equal_spans(m: int, n: int) -> Spans:
    """``ceil(m / n)`` batches whose sizes differ by at most one (fewer if that leaves one under 4)."""
    count = max(1, math.ceil(m / n))
    while count > 1 and m // count < 4:
        count -= 1
    base, extra = divmod(m, count)
    spans, start = [], 0
    for i in range(count):
        stop = start + base + (i < extra)
        spans.append((start, stop))
        start = stop
    return spans


def minibatch_cka(
    grams: list[torch.Tensor], order: torch.Tensor, spans: Spans, weight: Callable[[int], float]
) -> torch.Tensor:
    """Layer x layer minibatch CKA from the one-batch Grams, batches ``spans`` of ``order``."""
    sums = torch.zeros(len(grams), len(grams), dtype=torch.float64)
    for start, stop in spans:
        rows = order[start:stop]
        n = stop - start
        centred = torch.stack([u_centre(g[rows][:, rows]).flatten() for g in grams])
        sums += centred @ centred.T / (n * (n - 3)) * weight(n)
    own = sums.diagonal()
    return sums / torch.sqrt(own[:, None] * own[None, :])


def fmnist_grams(m: int, representation: Representation, seed: int) -> list[torch.Tensor]:
    """The one-batch Grams of every block of the bundled ``fmnist-vit@1`` on ``m`` Fashion-MNIST test images."""
    loaded = load(Catalog([BUNDLED_ROOT]).resolve("fmnist-vit@1"), torch.device("cpu"), require_vit=False)
    images, _ = fashion_mnist.load("test")
    picked = np.random.default_rng(seed).choice(len(images), m, replace=False)
    batch = loaded.preprocess([Image.fromarray(images[i], "L") for i in picked])
    spec = describe(loaded.network)
    grams: dict[str, torch.Tensor] = {}

    def keep(name: str, raw: torch.Tensor) -> None:
        grams[name] = gram(reduce(raw, representation, spec))

    run_layers(loaded.network, batch, keep, spec)
    return [grams[name] for name in spec.names]


def synthetic_grams(m: int, seed: int, layers: int = 6, width: int = 300) -> list[torch.Tensor]:
    """Grams of ``layers`` noisy non-linear views of a drifting 12-d latent: wider than ``m``, like ViT layers."""
    generator = torch.Generator().manual_seed(seed)

    def draw(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    latent = draw(m, 12)
    grams = []
    for layer in range(layers):
        features = torch.tanh(latent @ draw(12, width) * (1 + 0.3 * layer)) + (0.3 + 0.4 * layer) * draw(m, width)
        latent = latent + 0.3 * draw(m, 12)
        grams.append(gram(features))
    return grams


def rows(name: str, grams: list[torch.Tensor], sizes: list[int], orders: int) -> list[str]:
    m = grams[0].shape[0]
    one_batch = minibatch_cka(grams, torch.arange(m), [(0, m)], WEIGHTS["equal"])
    lines = []
    for n in sizes:
        rules = [(analysis_spans(m, n), weight) for weight in WEIGHTS] + [(near_equal_spans(m, n), "equal")]
        cells = []
        for spans, weight in rules:
            worst = []
            for k in range(orders):
                order = torch.randperm(m, generator=torch.Generator().manual_seed(k)) if k else torch.arange(m)
                worst.append(float((minibatch_cka(grams, order, spans, WEIGHTS[weight]) - one_batch).abs().max()))
            cells.append(f"{np.mean(worst):.4f} (first {worst[0]:.4f})")
        ragged = "+".join(str(b - a) for a, b in analysis_spans(m, n))
        equal = "+".join(str(b - a) for a, b in near_equal_spans(m, n))
        lines.append(f"| {name}, m={m}, n={n}: {ragged} / {equal} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--orders", type=int, default=20, help="image orders per setting (the first is as drawn)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(
        "| data, images m, batch size n: analysis batches / near-equal batches | "
        + " | ".join([*(f"analysis batches, weight {w}" for w in WEIGHTS), "near-equal batches"])
        + " |"
    )
    print("|---" * (len(WEIGHTS) + 2) + "|")
    representations: tuple[Representation, ...] = ("tokens", "gap")
    for representation in representations:
        for line in rows(
            f"fmnist-vit {representation}", fmnist_grams(100, representation, 0), [16, 32, 48], args.orders
        ):
            print(line)
    for line in rows("fmnist-vit tokens", fmnist_grams(70, "tokens", 1), [32], args.orders):
        print(line)
    for line in rows("synthetic", synthetic_grams(100, 0), [16, 32, 48], args.orders):
        print(line)


if __name__ == "__main__":
    main()
