"""``classlens evaluate``: token-removal faithfulness of relevance maps on Fashion-MNIST (docs/methods.md)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from classlens.cli.common import open_catalog, resolve
from classlens.core.settings import Settings

METHODS = ("projection", "gradient", "chefer", "random", "rollout", "gradcam")
PROTOCOLS = ("project", "paper")


@click.command("evaluate")
@click.option("--model", "reference", default="fmnist-vit", show_default=True)
@click.option("--method", "methods", multiple=True, type=click.Choice(METHODS), help="Repeatable; default: all.")
@click.option(
    "--images",
    "count",
    default=1000,
    show_default=True,
    type=click.IntRange(4, 10_000),
    help="The first N images of the Fashion-MNIST test set.",
)
@click.option("--layer", type=int, help="Layer of the projection map (default: the last).")
@click.option(
    "--map-kind",
    type=click.Choice(["logit", "probability", "identifiability"]),
    default="logit",
    show_default=True,
    help="Projection map values; identifiability has ties (C values), logits do not.",
)
@click.option(
    "--protocol",
    "protocols",
    multiple=True,
    type=click.Choice(PROTOCOLS),
    help="project: remove 0..90 % of the tokens, trapezoid; paper: keep n = 1..N tokens, sum / (max * N). "
    "Repeatable; default: both.",
)
@click.option("--batch-size", default=250, show_default=True, type=click.IntRange(1, 4096))
@click.option("--seed", default=0, show_default=True, help="Seed of the random-order baseline.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=Path("bench-results/faithfulness.json"))
@click.pass_obj
def evaluate_command(settings: Settings, reference: str, **options: Any) -> None:
    """Positive and negative perturbation AUC of each relevance method, per protocol, as tables and JSON."""
    import torch
    from PIL import Image

    from classlens.bench.faithfulness import relevance_methods
    from classlens.core import fashion_mnist
    from worker.lens.faithfulness import PAPER, PROJECT, evaluate_protocols
    from worker.runtime import load

    loaded = load(resolve(open_catalog(settings), reference))
    images, labels = fashion_mnist.load("test")
    count = options["count"]
    batch = loaded.preprocess([Image.fromarray(image, mode="L") for image in images[:count]])
    truth = torch.from_numpy(labels[:count]).to(loaded.device)
    layer = options["layer"] if options["layer"] is not None else loaded.spec.depth
    methods = relevance_methods(loaded.timm_vit, layer, options["map_kind"], options["seed"])
    chosen = {name: methods[name] for name in (options["methods"] or METHODS)}
    protocols = [protocol for protocol in (PROJECT, PAPER) if protocol.name in (options["protocols"] or PROTOCOLS)]
    results = evaluate_protocols(loaded.timm_vit, batch, truth, chosen, options["batch_size"], protocols)

    for protocol in protocols:
        click.echo(f"\n{loaded.entry.reference}, first {count} Fashion-MNIST test images")
        click.echo(f"protocol: {protocol.name} ({protocol.description})")
        _table(results[protocol.name])
    out: Path = options["out"]
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {"model": loaded.entry.reference, "images": count, "layer": layer, "map_kind": options["map_kind"]}
    # "methods" holds the project's protocol, as the record always has; "paper" the paper's.
    keys = {PROJECT.name: "methods", PAPER.name: "paper"}
    described = {protocol.name: protocol.description for protocol in protocols}
    document = {**record, "protocols": described, **{keys[name]: scores for name, scores in results.items()}}
    out.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    click.echo(f"wrote {out}", err=True)


def _table(results: dict[str, Any]) -> None:
    click.echo(f"{'method':<12} {'positive acc':>13} {'negative acc':>13} {'positive prob':>14} {'negative prob':>14}")
    for name, result in results.items():
        positive, negative = result["positive"]["auc"], result["negative"]["auc"]
        click.echo(
            f"{name:<12} {positive['accuracy']:>13.3f} {negative['accuracy']:>13.3f} "
            f"{positive['probability']:>14.3f} {negative['probability']:>14.3f}"
        )
