"""The contract between the lens (worker) and its callers (CLI, API, audits).

Torch-free, so the API process can validate and serve results without the
worker's dependencies. Maps are grid-sized lists of floats rounded to
:data:`MAP_DECIMALS` decimals: a 14x14 map is about 1.5 kB of JSON; hidden
states never leave the worker.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer

MAP_DECIMALS = 4
# The version of the explanation method, part of every result's content key (classlens.core.jobs.content_key).
# Bump it whenever a change alters what an explanation, an audit or an analysis contains (another
# statistic, a fixed rank, a map computed differently): every cached result of an older version is then
# simply never found again, instead of being served as if the new code had computed it.
LENS_VERSION = 3
MapKind = Literal["identifiability", "logit", "probability"]
NormMode = Literal["fresh", "cached"]
# The relevance methods an explanation can add beside the lens's maps (docs/methods.md, "Faithfulness").
BaselineMap = Literal["chefer", "rollout", "gradcam"]
BASELINE_MAPS: tuple[BaselineMap, ...] = ("chefer", "rollout", "gradcam")
# The most classes per token an explanation lists at every layer (``token_classes``): a 14x14 ViT-B with
# sublayers lists 196 tokens x 37 streams x 10 = 72,520 class indices at most.
MAX_TOKEN_CLASSES = 10
BASELINE_TITLES: dict[str, str] = {
    "chefer": "Chefer et al. relevance",
    "rollout": "attention rollout",
    "gradcam": "Grad-CAM",
}


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ExplainRequest(_Frozen):
    """What to explain about one image; the same parameters serve the CLI and the API."""

    targets: list[int | str] | None = Field(
        default=None, description="Class indices or label names; default: the top-k predictions."
    )
    top_k: int = Field(default=3, ge=1, le=20, description="Predictions to explain when no targets are given.")
    layers: list[int] | None = Field(
        default=None, description="Layers for projection maps (0 = embedding, L = last block); default: [L]."
    )
    map_kind: MapKind = "identifiability"
    sublayers: bool = Field(default=True, description="Also rank the attention and MLP outputs of every block.")
    gradient_map: bool = Field(default=False, description="Also compute the gradient relevance map (a backward pass).")
    norm: NormMode = Field(default="fresh", description="Final-norm statistics: the paper's fresh, or cached.")
    bias: bool = Field(default=True, description="Include the head bias in the projection.")
    baseline_maps: list[BaselineMap] = Field(
        default_factory=list,
        max_length=len(BASELINE_MAPS),
        description="Also compute these methods' maps: Chefer et al. 2021, attention rollout, Grad-CAM.",
    )
    token_classes: int = Field(
        default=0,
        ge=0,
        le=MAX_TOKEN_CLASSES,
        description="Also list the top-k classes of every image token at every layer and stream (0: none).",
    )

    @property
    def needs_gradients(self) -> bool:
        """Whether a backward pass through the model is needed (an ONNX graph cannot do it); rollout needs none."""
        return self.gradient_map or any(name != "rollout" for name in self.baseline_maps)

    @model_serializer(mode="wrap")
    def _without_empty_baselines(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # Absent unless asked for, so that a request without baselines keeps the parameters, hence the
        # content key, it had before the field existed.
        data: dict[str, Any] = handler(self)
        if not self.baseline_maps:
            data.pop("baseline_maps", None)
        if not self.token_classes:
            data.pop("token_classes", None)
        return data


class ModelRef(_Frozen):
    name: str
    version: str
    weights_sha256: str


class ClassScore(_Frozen):
    index: int
    label: str
    probability: float
    logit: float


class StreamStats(_Frozen):
    """Per layer, for one target class, over one stream (residual, attention or MLP outputs)."""

    prefix_ranks: dict[str, list[int]] = Field(description="Rank of the class at each prefix token, per layer.")
    image_identifiability: list[float] = Field(description="Mean identifiability 1 - rank/C over image tokens.")
    image_top1_share: list[float] = Field(description="Share of image tokens where the class is top-1.")


class TargetExplanation(_Frozen):
    index: int
    label: str
    probability: float
    logit: float
    rank: int = Field(description="Rank of the class in the model's output (0 = predicted).")
    emergence_layer: int | None = Field(
        description="First layer from which the class stays top-1 at the pooled representation; null if never."
    )
    pooled_ranks: list[int] = Field(description="Rank at the pooled representation per layer 0..L.")
    residual: StreamStats = Field(description="Residual stream x_0..x_L (L + 1 entries; 0 = embedding).")
    attention: StreamStats | None = Field(default=None, description="Attention outputs a_1..a_L (L entries).")
    mlp: StreamStats | None = Field(default=None, description="MLP outputs m_1..m_L (L entries).")
    projection_maps: dict[str, list[list[float]]] = Field(description="Layer (as a string) -> h x w map.")
    gradient_map: list[list[float]] | None = None
    baseline_maps: dict[BaselineMap, list[list[float]]] | None = Field(
        default=None, description="Method -> h x w map, for the baseline_maps the request asked for."
    )

    @model_serializer(mode="wrap")
    def _without_absent_baselines(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # Absent unless asked for: a result without baselines reads exactly as before the field existed.
        data: dict[str, Any] = handler(self)
        if self.baseline_maps is None:
            data.pop("baseline_maps", None)
        return data


class Explanation(_Frozen):
    model: ModelRef
    norm: NormMode
    bias: bool
    map_kind: MapKind
    grid: tuple[int, int]
    patch_size: tuple[int, int]
    prefix_tokens: list[str]
    layers: int = Field(description="Number of blocks L; layer 0 is the embedding.")
    pooling: Literal["token", "avg", "max", "avgmax"]
    prediction: list[ClassScore]
    targets: list[TargetExplanation]
    token_classes: dict[Literal["residual", "attention", "mlp"], list[list[list[int]]]] | None = Field(
        default=None,
        description="Stream -> per layer (residual 0..L, attention and MLP 1..L), per image token, the indices "
        "of its top-k classes, best first; only when the request asked for token_classes.",
    )
    entropy: float | None = Field(
        default=None,
        description="Entropy of the model's softmax over all its classes, in nats (natural log); the lens "
        "always reports it, so that a caller needs no second look at the classes beyond the top 5.",
    )

    @model_serializer(mode="wrap")
    def _without_absent_token_classes(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # Absent unless asked for: a default result reads exactly as before the field existed.
        data: dict[str, Any] = handler(self)
        if self.token_classes is None:
            data.pop("token_classes", None)
        if self.entropy is None:
            data.pop("entropy", None)
        return data


# --- Jobs: the records the API and the workers share through the store. ---

JobStatus = Literal["queued", "running", "succeeded", "failed"]
# "model": registering a model uploaded through POST /v1/models (the job's result is a ModelRegistration).
JobKind = Literal["explanation", "audit", "analysis", "model"]
TERMINAL_STATUSES: frozenset[str] = frozenset({"succeeded", "failed"})


class Progress(_Frozen):
    done: int = Field(ge=0)
    total: int = Field(ge=0)


class JobError(_Frozen):
    """Why a job failed, in words for people: ``title`` is short, ``detail`` says what to change."""

    title: str
    detail: str


class Job(_Frozen):
    """One unit of queued work. Small on purpose: the image and the result live under their own keys."""

    id: str
    kind: JobKind
    status: JobStatus
    created_at: float = Field(description="Unix time.")
    updated_at: float
    started_at: float | None = None
    finished_at: float | None = None
    model: str = Field(description="The resolved model, name@version.")
    parameters: dict[str, Any] = Field(description="The canonical request parameters (an ExplainRequest).")
    content_key: str = Field(
        description="sha256 of the lens version, the model's result fingerprint, the input digest and the "
        "canonical parameters (classlens.core.jobs.content_key)."
    )
    image_key: str | None = Field(default=None, description="sha256 of the uploaded image bytes.")
    progress: Progress = Progress(done=0, total=1)
    error: JobError | None = None
    batch_size: int | None = Field(
        default=None, description="Explanations only: how many jobs shared the forward pass that ran this one."
    )
    fingerprints: dict[str, str] = Field(
        default_factory=dict,
        description="name@version -> the result fingerprint of that model as the API resolved it; a worker "
        "whose catalog entry differs looks again and refuses the job rather than store a result under a key "
        "that names other content.",
    )
    owner: str | None = Field(
        default=None,
        description="The id of the API key that submitted the job (None: authentication off); other keys never see it.",
    )
    follows: str | None = Field(
        default=None,
        description="The job (of another owner) computing this job's result: this record is its owner's own view "
        "of that work, and takes its status from it (classlens.core.jobs.JobStore.get).",
    )


class ModelRegistration(_Frozen):
    """The result of a ``model`` job: what was registered, as the catalog now serves it."""

    reference: str = Field(description="name@version")
    name: str
    version: str
    framework: str
    architecture: str
    classes: int
    weights_sha256: str
    structure: dict[str, Any] | None = Field(description="The manifest's structure; null for analyses-only models.")
    result_fingerprint: str = Field(description="What result content keys of this version are made of.")


# --- Audits: many images explained in one job, summarised per image and overall. ---


class AuditImage(_Frozen):
    """One image of an audit: its name as uploaded, its store key and its true class (if known)."""

    file: str
    image_key: str = Field(description="sha256 of the image bytes (``image:<key>`` in the store).")
    label: int | None = Field(default=None, description="The true class index, when the client gave one.")


class AuditManifest(_Frozen):
    """An audit's images, stored under its own key so that the job record stays small."""

    images: list[AuditImage]


# The map kind an audit's location columns read: the explained class's probability at each image token,
# which, unlike identifiability, does not sit at 1.0 over every cell where the class is top-1 (see
# ``worker.audits.locate_relevance``). The API's audit parameters set it (``service.routes.audits``).
AUDIT_MAP_KIND: MapKind = "probability"


class RelevanceLocation(_Frozen):
    """Where a projection map puts its relevance (see ``worker.audits.locate_relevance``)."""

    peak_row: int
    peak_col: int
    peak_ties: int = Field(
        description="Cells that equal the maximum; the peak is the first of them in row-major order."
    )
    central_share: float | None = Field(description="Share of positive relevance in the central box; null if none.")


class Signals(_Frozen):
    """What monitoring reads of one explanation, about its predicted class only (classlens.core.monitoring.signals)."""

    predicted_index: int
    map_kind: MapKind = Field(description="The kind of the map that concentration reads.")
    confidence: float = Field(description="The top-1 probability.")
    margin: float = Field(description="Top-1 minus top-2 probability (the top-1 probability for a 1-class model).")
    explained: bool = Field(description="Whether the predicted class was among the explained targets.")
    emergence_layer: int | None = Field(
        description="The predicted class's emergence layer; null if never (or not explained)."
    )
    identifiability: float | None = Field(
        description="Mean identifiability of the predicted class over the last layer's image tokens (null: unexplained)"
    )
    concentration: float | None = Field(
        description="Share of the last-block map's positive mass in its top 10 % of tokens; null without map or mass."
    )


class AuditRow(_Frozen):
    file: str
    true_index: int | None
    true_label: str | None
    predicted_index: int
    predicted_label: str
    probability: float = Field(description="The top-1 probability (the same value as ``confidence``).")
    confidence: float = Field(description="The top-1 probability.")
    margin: float = Field(description="Top-1 minus top-2 probability (the top-1 probability for a 1-class model).")
    entropy: float = Field(description="Entropy of the softmax over all classes, in nats.")
    top_k: list[ClassScore] = Field(description="The request's top_k best classes, best first.")
    correct: bool | None = Field(description="Predicted == true; null without a true label.")
    predicted_emergence_layer: int | None
    true_emergence_layer: int | None
    explained_index: int = Field(description="The class whose map locates the relevance.")
    explained_label: str
    map_kind: MapKind = Field(description="The kind of map that ``map`` holds and the location columns read.")
    peak_row: int
    peak_col: int
    peak_ties: int
    central_share: float | None
    border_share: float | None
    region_shares: list[list[float]] | None = Field(
        description="The map's positive mass in a 3 x 3 grid of regions (rows top to bottom); null if none."
    )
    relevance_by_layer: dict[str, RelevanceLocation] = Field(description="Layer (as a string) -> location.")
    map: list[list[float]] = Field(
        description="The explained class's map at the last block, the one the location columns read (grid rows x cols)."
    )
    signals: Signals | None = Field(default=None, description="What monitoring reads of the image's explanation.")


class ConfusionCell(_Frozen):
    true_index: int
    true_label: str
    predicted_index: int
    predicted_label: str
    count: int


class ClassEmergence(_Frozen):
    """The emergence of one predicted class over the images predicted as it."""

    index: int
    label: str
    images: int
    mean_emergence_layer: float | None = Field(description="Over the images where the class emerged; null if none.")
    never: int = Field(description="Images where the class had not emerged by the last layer.")


class AuditAggregates(_Frozen):
    images: int
    labelled: int
    correct: int
    accuracy: float | None = Field(description="correct / labelled; null without labels.")
    confusion: list[ConfusionCell] = Field(description="Non-zero (true, predicted) counts over labelled images.")
    mean_emergence_by_class: list[ClassEmergence]
    emergence_histogram: dict[str, int] = Field(description="Layer '0'..'L' or 'never' -> images (predicted class).")
    mean_top1_probability: float
    mean_margin: float | None = Field(description="Mean top-1 minus top-2 probability; null without rows.")
    mean_entropy: float | None = Field(
        description="Mean entropy of the softmax over all classes (nats); null without rows."
    )
    mean_central_share: float | None
    central_cells_share: float = Field(description="Share of grid cells in the central box: a uniform map's share.")


class AuditResult(_Frozen):
    model: ModelRef
    layers: int
    grid: tuple[int, int]
    map_kind: MapKind
    relevance_layer: int = Field(description="The layer whose map gives each row's peak and central share.")
    rows: list[AuditRow]
    aggregates: AuditAggregates


# --- Analyses: the representation analyses of docs/methods.md (and section 1's
# memories and perturbations), run over a batch of images as one job. ---

AnalysisKind = Literal[
    "cka",
    "attention-distance",
    "skip-ratio",
    "localization",
    "probes",
    "memories",
    "perturb",
    "residual",
    "compare",
    "token-probes",
    "gradient-parts",
    "significance",
]
Representation = Literal["tokens", "cls", "gap"]

# Every kind is held to it: CKA's unbiased estimator needs a minibatch of at least 4 images.
ANALYSIS_MIN_IMAGES = 4


@dataclass(frozen=True)
class AnalysisRules:
    """What one analysis kind asks of its request and its model(s).

    One row per kind in :data:`ANALYSIS_RULES`: the API refuses at submission what a row rules
    out, and the worker checks the same row again before it runs the kind, so that the two never
    disagree about what a kind accepts.
    """

    # compare_to: refused ("never"), allowed, or required (the second model of a comparison).
    second_model: Literal["never", "optional", "required"] = "never"
    # "ignored": labels are not read (nor checked against the model's classes).
    labels: Literal["ignored", "optional", "required"] = "optional"
    # It opens the blocks of a Vision Transformer (attention, MLP memories, token grid, residual streams).
    vit: bool = False
    # It reads ``representation``, and so needs a CLS token when that is "cls".
    representation: bool = False
    # It takes ``region`` (a box of the token grid).
    region: bool = False
    # It takes ``layer``: 0 (the embedding) to L, or 1 to L where ``layer_from`` is 1 (a block).
    layer: bool = False
    layer_from: int = 0


ANALYSIS_RULES: Mapping[str, AnalysisRules] = {
    "cka": AnalysisRules(second_model="optional", labels="ignored", representation=True),
    "attention-distance": AnalysisRules(vit=True),
    "skip-ratio": AnalysisRules(),
    "localization": AnalysisRules(vit=True),
    "probes": AnalysisRules(labels="required", representation=True),
    "memories": AnalysisRules(vit=True),
    "perturb": AnalysisRules(vit=True, region=True),
    "residual": AnalysisRules(vit=True),
    "compare": AnalysisRules(second_model="required", representation=True),
    "token-probes": AnalysisRules(labels="required", vit=True, layer=True),
    "gradient-parts": AnalysisRules(vit=True, layer=True, layer_from=1),
    "significance": AnalysisRules(vit=True),
}


def analysis_kinds(rule: Callable[[AnalysisRules], bool]) -> frozenset[str]:
    """The analysis kinds whose row meets ``rule`` (e.g. those that take a region)."""
    return frozenset(kind for kind, rules in ANALYSIS_RULES.items() if rule(rules))


class AnalysisRequest(_Frozen):
    """What to analyse; the images (and, for probes, their labels) travel separately, as for audits.

    ``compare`` is the model-comparison report: CKA between every layer of ``model`` and of
    ``compare_to``, plus each model's own figures side by side, as one HTML page.
    """

    kind: AnalysisKind
    compare_to: str | None = Field(
        default=None, description="A second model (name or name@version): needed by compare, optional for cka."
    )
    representation: Representation = Field(
        default="tokens", description="CKA / probes: all tokens flattened, the CLS token, or the GAP of image tokens."
    )
    batch_size: int = Field(default=32, ge=4, le=512, description="Images per minibatch (CKA needs at least 4).")
    prefix_rows: Literal["drop", "renormalise"] = Field(
        default="drop",
        description="Attention distance: drop prefix-token rows and columns (the reference), or also "
        "renormalise each query's image-token weights to sum to 1.",
    )
    region: tuple[int, int, int, int] | None = Field(
        default=None, description="Perturb: grid box (row0, col0, row1, col1), end-exclusive, whose tokens are dropped."
    )
    ridge: float = Field(default=1.0, gt=0, description="Probes: the ridge penalty.")
    top_memories: int = Field(default=5, ge=1, le=50, description="Memories: value vectors listed per class.")
    agreement: Literal["normalised", "reference"] = Field(
        default="normalised",
        description="Memories: key-value agreement with each class's top-5 values by the normalised class-direction "
        "cosine, over image tokens; or by the unnormalised head.weight @ fc2.weight over all tokens (the reference).",
    )
    no_cls: Literal["pre_softmax", "zero_renormalised", "zero"] = Field(
        default="pre_softmax",
        description="Perturb: no-CLS attention masks the prefix keys before the softmax; or zeroes them after it and "
        "renormalises; or zeroes them after it without renormalising (the reference).",
    )
    layer: int | None = Field(
        default=None,
        ge=0,
        le=1000,
        description="Token-probes: the layer of the relevance maps (0 = embedding .. L); gradient-parts: the block "
        "of the per-head maps (1 .. L). Default: the last block L.",
    )

    @model_serializer(mode="wrap")
    def _without_unset_layer(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """The parameters without ``layer`` when none was given.

        The canonical parameters make the content key, so a request that does not use ``layer``
        keeps the key it had before the field existed (and its cached result).
        """
        data: dict[str, Any] = handler(self)
        if data.get("layer", 0) is None:
            del data["layer"]
        return data


def layer_problem(kind: str, layer: int | None, depth: int | None) -> str | None:
    """Why ``layer`` cannot be the layer of a ``kind`` analysis of a model of ``depth`` blocks; None if it can.

    ``depth`` None: not known (a manifest without structure); then only the lower bound is checked.
    """
    if layer is None:
        return None
    rules = ANALYSIS_RULES[kind]
    if not rules.layer:
        takers = " and ".join(sorted(analysis_kinds(lambda row: row.layer)))
        return f"layer is a parameter of {takers} only"
    if layer < rules.layer_from or (depth is not None and layer > depth):
        what = "blocks" if rules.layer_from else "layers (0 = the embedding)"
        return f"layer {layer} is out of range: the {what} of {kind} are {rules.layer_from} to {depth or 'L'}"
    return None


class AnalysisResult(_Frozen):
    """An analysis' numbers and the names of its figures (PNG; ``report`` is HTML for compare)."""

    kind: AnalysisKind
    models: list[ModelRef]
    images: int
    data: dict[str, Any] = Field(description="The figures' numbers, per kind (see docs/analyses.md).")
    figures: dict[str, str] = Field(
        default_factory=dict, description="Figure name -> sha256 of its bytes (``figure:<sha>`` in the store)."
    )
