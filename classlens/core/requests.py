"""What an explain request means, decided once for the API, the worker and the command line.

A client names a class by its index or by its label, and a layer by its number. The same
words must mean the same thing wherever they arrive, so these rules live here, torch-free,
and nowhere else. A request they refuse raises :class:`RequestError`, which says what to
change in the words the API answers with; which HTTP status that is, is the service's
business (``service/errors.py``). The worker and the command line show its detail as it is.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import ValidationError

from classlens.core.contract import BASELINE_MAPS, ExplainRequest

DEFAULT_TOP_K: int = ExplainRequest.model_fields["top_k"].default


class RequestError(ValueError):
    """A request that cannot be honoured as sent: a machine name (``problem``), what to change, a short title.

    ``extra`` holds further members of the API's problem body, such as the ``file`` at fault.
    """

    def __init__(self, problem: str, detail: str, title: str = "Invalid parameter", **extra: Any):
        super().__init__(detail)
        self.problem = problem
        self.detail = detail
        self.title = title
        self.extra = extra

    def __reduce__(self) -> tuple[Any, ...]:
        # Exceptions pickle their args, which here is the detail alone: give back every field.
        return type(self), (self.problem, self.detail, self.title), {"extra": self.extra}


def is_index(text: str) -> bool:
    """ASCII digits only: ``str.isdigit`` also accepts ``²`` or ``٣``, which are label names here, not indices."""
    return text.isascii() and text.isdigit()


def parse_class(text: str) -> int | str:
    """A class as written in text (a form field, a CSV cell, a URL, an option): digits are an index, the rest a name."""
    text = text.strip()
    return int(text) if is_index(text) else text


class ClassNames:
    """Classes looked up as a client names them: by index, or by label in any case and without surrounding spaces.

    ``labels`` is a model's labels in class order, or the index -> label pairs of some of its classes.
    """

    def __init__(self, labels: Sequence[str] | Mapping[int, str]):
        self.labels = dict(labels) if isinstance(labels, Mapping) else dict(enumerate(labels))
        self._by_name = {label.casefold(): index for index, label in self.labels.items()}

    def find(self, value: int | str) -> int | None:
        """The class index ``value`` names; ``None`` when it names none (a boolean names none)."""
        if isinstance(value, bool):
            return None
        if isinstance(value, int):
            return value if value in self.labels else None
        if isinstance(value, str):
            return self._by_name.get(value.strip().casefold())
        return None


def resolve_targets(targets: Sequence[int | str], labels: Sequence[str]) -> list[int]:
    """Class indices from indices or label names, each class at most once; refused at the first bad one."""
    if len(targets) > len(labels):
        raise RequestError(
            "too_many_targets",
            f"{len(targets):,} targets for a model of {len(labels)} classes: name each class at most once",
            "Too many targets",
        )
    classes = ClassNames(labels)
    resolved: list[int] = []
    for target in targets:
        if isinstance(target, bool) or not isinstance(target, int | str):
            raise RequestError("bad_parameter", f"target {target!r} is neither a class index nor a label")
        index = classes.find(target)
        if index is None and isinstance(target, int):
            raise RequestError(
                "unknown_class",
                f"class index {target} is out of range: the model has classes 0..{len(labels) - 1}",
                "Unknown class",
            )
        if index is None:
            close = difflib.get_close_matches(str(target), labels, n=3)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise RequestError("unknown_class", f"unknown class {target!r}{hint}", "Unknown class")
        resolved.append(index)
    if len(set(resolved)) != len(resolved):
        raise RequestError("bad_parameter", "targets repeat a class")
    return resolved


def check_layers(layers: Sequence[int], depth: int) -> list[int]:
    """``layers`` sorted and without repeats, each between 0 (the embedding) and ``depth`` (the last block)."""
    bad = [layer for layer in layers if not 0 <= layer <= depth]
    if bad:
        raise RequestError(
            "bad_parameter", f"layer {bad[0]} is out of range: layers are 0 (embedding) to {depth} (last block)"
        )
    return sorted(set(layers))


def canonical_layers(value: Sequence[int] | str | None, depth: int | None) -> list[int] | None:
    """The layers of the maps made explicit: none asked for is the last block, ``"all"`` is every layer.

    ``depth`` is ``None`` when the model's depth is not known here; the layers are then only
    sorted, and whoever builds the model checks them.
    """
    if value is None:
        return [depth] if depth is not None else None
    if value == "all":
        if depth is None:
            raise RequestError(
                "bad_parameter", "this model's manifest does not give its depth: list the layers instead of 'all'"
            )
        return list(range(depth + 1))
    if isinstance(value, str):
        raise RequestError("bad_parameter", f"layers {value!r} are neither a list of layers nor 'all'")
    return check_layers(value, depth) if depth is not None else sorted(set(value))


def invalid_parameters(error: ValidationError) -> RequestError:
    """Every parameter a request model (explain, analysis, registration) refused, and why."""
    details = [f"{'.'.join(str(p) for p in item['loc'])}: {item['msg']}" for item in error.errors()]
    return RequestError("bad_parameter", "; ".join(details), errors=details)


def canonical_request(fields: Mapping[str, Any], labels: Sequence[str], depth: int | None) -> ExplainRequest:
    """The explain parameters checked against the model and rewritten so that requests meaning the same are equal.

    Equal requests share one content key, hence one cached result and one computation: label
    names become class indices, layers are sorted, de-duplicated and made explicit,
    ``top_k`` is neutral when explicit targets make it irrelevant (and at most the number of classes),
    and the baseline maps are de-duplicated in one fixed order.
    """
    values = dict(fields)
    targets = values.pop("targets", None)
    if targets:
        values["targets"] = resolve_targets(targets, labels)
        values["top_k"] = DEFAULT_TOP_K
    else:
        values["top_k"] = min(int(values.get("top_k", DEFAULT_TOP_K)), len(labels))
    values["layers"] = canonical_layers(values.get("layers"), depth)
    try:
        request = ExplainRequest.model_validate(values)
    except ValidationError as error:
        raise invalid_parameters(error) from error
    baselines = [name for name in BASELINE_MAPS if name in request.baseline_maps]
    return request.model_copy(update={"baseline_maps": baselines})
