"""One entry point for every analysis: what the CLI (``classlens analyze``) and the worker task call.

STUB: the signature is the contract between the analysis library and its callers; the body is
being written (issue #5).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from classlens.contract import AnalysisRequest
from worker.runtime import LoadedModel

Progress = Callable[[int, int], None]  # (done, total), called as the work advances


class AnalysisError(ValueError):
    """A request the analysis cannot honour (e.g. probes without labels, a CNN for attention distance)."""


@dataclass
class AnalysisOutcome:
    data: dict[str, Any]  # JSON-able numbers behind the figures (AnalysisResult.data)
    figures: dict[str, bytes] = field(default_factory=dict)  # name -> PNG bytes ("report" -> HTML bytes)


def run_analysis(
    request: AnalysisRequest,
    models: Sequence[LoadedModel],
    images: Sequence[Image.Image],
    labels: np.ndarray | None,
    progress: Progress = lambda done, total: None,
) -> AnalysisOutcome:
    """Run ``request`` on ``models`` (one, or two for cka-across / compare) over ``images``."""
    raise NotImplementedError
