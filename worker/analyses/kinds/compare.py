"""``compare``: the model-comparison report, CKA between two models plus each one's own figures, as one HTML page."""

from __future__ import annotations

from typing import Any

from timm.models.vision_transformer import VisionTransformer

from worker.analyses.job import AnalysisJob, AnalysisOutcome, is_lens_vit, model_name
from worker.analyses.kinds import attention_distance, cka, probes, skip_ratio
from worker.analyses.layer_probes import SPLIT_RULE
from worker.analyses.report import Section, Table, html_report


def check(job: AnalysisJob) -> None:
    cka.check_representations(job)


def run(job: AnalysisJob) -> AnalysisOutcome:
    first, second = job.models
    vits = [isinstance(m.network, VisionTransformer) and is_lens_vit(m) for m in job.models]
    skips = [skip_ratio.supported(m) for m in job.models]
    per_model_passes = sum(vits) + sum(skips) + (2 if job.labels is not None else 0)
    job.steps.plan(len(job.spans) * (1 + per_model_passes))
    cka_part = cka.part(job)
    data: dict[str, Any] = {"models": [model_name(first), model_name(second)], "cka": cka_part, "per_model": []}
    outcome = AnalysisOutcome(data, {"cka": cka.figure(cka_part)})
    for suffix, loaded, vit, skip in zip(("a", "b"), job.models, vits, skips, strict=True):
        part: dict[str, Any] = {"model": model_name(loaded)}
        part["attention_distance"] = attention_distance.part(job, loaded) if vit else None
        part["skip_ratio"] = skip_ratio.part(job, loaded) if skip else None
        part["probes"] = probes.part(job, loaded) if job.labels is not None else None
        if part["skip_ratio"] is not None:
            outcome.figures[f"skip_ratio_{suffix}"] = skip_ratio.figure(part["skip_ratio"])
        if part["probes"] is not None:
            outcome.figures[f"probes_{suffix}"] = probes.figure(part["probes"])
        data["per_model"].append(part)
    distances = [part["attention_distance"] for part in data["per_model"] if part["attention_distance"] is not None]
    if distances:  # one scatter for both models: one scale
        outcome.figures["attention_distance"] = attention_distance.figure(distances)
    outcome.figures["report"] = _report(job, data, outcome.figures)
    return outcome


def _report(job: AnalysisJob, data: dict[str, Any], pictures: dict[str, bytes]) -> bytes:
    first, second = job.models
    summary = Table(
        ["", "model A", "model B"],
        [
            ["model", model_name(first), model_name(second)],
            ["architecture", first.entry.manifest.architecture, second.entry.manifest.architecture],
            ["weights sha256", first.ref.weights_sha256[:16], second.ref.weights_sha256[:16]],
            ["layers compared", len(data["cka"]["rows"]["layers"]), len(data["cka"]["columns"]["layers"])],
            ["images", len(job.images), len(job.images)],
            ["labels", "yes" if job.labels is not None else "no", "yes" if job.labels is not None else "no"],
        ],
        caption=f"Representation {job.request.representation}, batches of {job.request.batch_size} images.",
    )
    cka_data = data["cka"]
    cka_table = Table(
        ["layer of A", "most similar layer of B", "CKA"],
        [[match["row"], match["column"], match["cka"]] for match in cka_data["best_match"]],
    )
    tables = [cka_table]
    if "same_layer" in cka_data:
        same = cka_data["same_layer"]
        tables.insert(
            0,
            Table(
                ["layer", "CKA(A, B) at the same layer"],
                [[n, v] for n, v in zip(cka_data["rows"]["layers"], same, strict=True)],
                caption="The regression-test figure: 1 means the layer represents the images alike in both models.",
            ),
        )
    sections = [
        Section(
            "Centred kernel alignment between the two models",
            "Minibatch CKA with the unbiased HSIC over the same images in the same order (rows paired).",
            [("CKA, every layer of A against every layer of B", pictures["cka"])],
            tables,
        )
    ]
    parts = data["per_model"]
    for key, title, note in (
        ("attention_distance", "Mean attention distance", "Per head, in pixels of the model input (ViTs only)."),
        (
            "skip_ratio",
            "Skip-connection ratio",
            "||z|| / ||f(z)|| per block: large means the block mostly passes its input on.",
        ),
        ("probes", "Linear probes and the class-embedding projection", SPLIT_RULE),
    ):
        if key == "attention_distance":
            figures_here = [("both models, every head", pictures[key])] if key in pictures else []
        else:
            figures_here = [
                (part["model"], pictures[f"{key}_{suffix}"])
                for suffix, part in zip(("a", "b"), parts, strict=True)
                if part[key] is not None
            ]
        if not figures_here:
            continue
        section_tables = [_part_table(key, part[key]) for part in parts if part[key] is not None]
        sections.append(Section(title, note, figures_here, section_tables))
    if job.labels is None:
        sections.append(Section("Linear probes", "Not run: the images came without labels."))
    return html_report(f"ClassLens comparison: {model_name(first)} vs {model_name(second)}", summary, sections)


def _part_table(key: str, part: dict[str, Any]) -> Table:
    layers = part["layers"]
    if key == "attention_distance":
        return Table(
            ["layer", "mean over heads (px)", "min head", "max head"],
            [
                [layer, mean, min(row), max(row)]
                for layer, mean, row in zip(layers, part["mean_per_block"], part["distances"], strict=True)
            ],
            caption=part["model"],
        )
    if key == "skip_ratio":
        names = [n for n in ("attention_cls", "attention_image", "mlp_cls", "mlp_image", "block_image") if n in part]
        return Table(
            ["layer", *names],
            [[layer, *(part[n][i] for n in names)] for i, layer in enumerate(layers)],
            caption=part["model"],
        )
    positions = list(part["probes"])
    headers = ["layer", *(f"probe {p}" for p in positions)] + (["projection"] if part["projection"] is not None else [])
    rows = [
        [layer, *(part["probes"][p][i] for p in positions)]
        + ([part["projection"][i]] if part["projection"] is not None else [])
        for i, layer in enumerate(layers)
    ]
    return Table(headers, rows, caption=f"{part['model']}: held-out accuracy ({part['split']['test']} images)")
