"""The request rules of classlens.core.requests, one by one, and the HTTP status each refusal gets.

The API, the worker and the command line each had their own copy of some of these rules and
the copies disagreed (whitespace, booleans, non-ASCII digits, more targets than classes); each
such case has a test here, so that the one remaining definition keeps the agreed answer.
"""

import pickle

import pytest
from pydantic import ValidationError

from classlens.core.contract import ExplainRequest
from classlens.core.requests import (
    DEFAULT_TOP_K,
    ClassNames,
    RequestError,
    canonical_layers,
    canonical_request,
    check_layers,
    invalid_parameters,
    is_index,
    parse_class,
    resolve_targets,
)
from service.errors import problem_for
from worker.lens.explain import ExplainError
from worker.lens.explain import check_layers as lens_check_layers
from worker.lens.explain import resolve_targets as lens_resolve_targets

LABELS = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def refusal(call, *arguments) -> RequestError:
    with pytest.raises(RequestError) as raised:
        call(*arguments)
    return raised.value


# -- digits are an index, anything else a label ----------------------------------------------------


@pytest.mark.parametrize(("text", "parsed"), [("3", 3), (" 3 ", 3), ("03", 3), ("Bag", "Bag"), (" Bag ", "Bag")])
def test_digits_are_an_index_and_the_rest_a_label(text, parsed):
    assert parse_class(text) == parsed


@pytest.mark.parametrize("text", ["²", "٣", "３", "-1", "1.0", "+2", "", "3 4"])
def test_only_ascii_digits_are_an_index(text):
    """The command line used str.isdigit, which takes ``²`` for a digit (and int() then fails on it)."""
    assert not is_index(text)
    assert parse_class(text) == text.strip()


# -- naming a class -----------------------------------------------------------------------------------


def test_a_class_is_found_by_index_or_by_label_in_any_case_and_spacing():
    names = ClassNames(LABELS)
    assert names.find(8) == 8
    assert names.find("bag") == names.find(" BAG ") == names.find("Bag") == 8
    assert names.find("ankle BOOT") == 9
    assert names.find(10) is None
    assert names.find(-1) is None
    assert names.find("Bags") is None
    assert names.find("8") is None


def test_booleans_name_no_class():
    """``True == 1`` in Python: the API's copies took ``True`` for class 1, the lens refused it."""
    assert ClassNames(LABELS).find(True) is None
    assert ClassNames(LABELS).find(False) is None


def test_some_classes_keep_their_own_indices():
    names = ClassNames({1: "Trouser", 0: "T-shirt/top"})
    assert names.find(1) == 1
    assert names.find("t-shirt/top") == 0
    assert names.find(2) is None
    assert names.find("Pullover") is None


# -- targets ------------------------------------------------------------------------------------------


def test_targets_by_index_and_by_label():
    assert resolve_targets(["bag", 1, "ANKLE boot"], LABELS) == [8, 1, 9]


def test_targets_are_stripped_of_whitespace():
    """The API stripped label names, the lens did not: ``" bag "`` was class 8 in one and unknown in the other."""
    assert resolve_targets([" bag ", "\tCoat"], LABELS) == [8, 4]


@pytest.mark.parametrize("target", [True, False, 1.5, None])
def test_a_target_that_is_neither_index_nor_label_is_refused(target):
    error = refusal(resolve_targets, [target], LABELS)
    assert (error.problem, error.title) == ("bad_parameter", "Invalid parameter")
    assert error.detail == f"target {target!r} is neither a class index nor a label"


@pytest.mark.parametrize("index", [10, -1, 10**300])
def test_an_index_out_of_range_is_an_unknown_class(index):
    error = refusal(resolve_targets, [index], LABELS)
    assert (error.problem, error.title) == ("unknown_class", "Unknown class")
    assert error.detail == f"class index {index} is out of range: the model has classes 0..9"


def test_an_unknown_label_says_what_was_meant():
    error = refusal(resolve_targets, ["Sandle"], LABELS)
    assert (error.problem, error.detail) == ("unknown_class", "unknown class 'Sandle'; did you mean 'Sandal'?")
    assert refusal(resolve_targets, ["T-shirt"], LABELS).detail == (
        "unknown class 'T-shirt'; did you mean 'T-shirt/top', 'Shirt'?"
    )
    assert refusal(resolve_targets, ["zebra"], LABELS).detail == "unknown class 'zebra'"
    assert refusal(resolve_targets, ["²"], LABELS).detail == "unknown class '²'"


def test_the_first_bad_target_is_named():
    assert refusal(resolve_targets, ["bag", "zebra", 99], LABELS).detail == "unknown class 'zebra'"


@pytest.mark.parametrize("targets", [[5, 5], ["bag", 8], [" Bag", "bag "], [9, "Ankle Boot"]])
def test_targets_name_each_class_once(targets):
    error = refusal(resolve_targets, targets, LABELS)
    assert (error.problem, error.detail) == ("bad_parameter", "targets repeat a class")


def test_more_targets_than_classes_are_refused_before_any_is_looked_up():
    """The lens had no such rule: it answered ``targets repeat a class`` or named an unknown class instead."""
    error = refusal(resolve_targets, [*range(10), "zebra"], LABELS)
    assert (error.problem, error.title) == ("too_many_targets", "Too many targets")
    assert error.detail == "11 targets for a model of 10 classes: name each class at most once"
    assert refusal(resolve_targets, list(range(2_000)), LABELS).detail.startswith("2,000 targets")
    assert resolve_targets(list(range(10)), LABELS) == list(range(10))


# -- layers -------------------------------------------------------------------------------------------


def test_layers_are_sorted_without_repeats():
    assert check_layers([2, 0, 0, 1], 2) == [0, 1, 2]


@pytest.mark.parametrize(("layers", "bad"), [([3], 3), ([0, 5, 1], 5), ([-1], -1), ([1, -2, 7], -2)])
def test_layers_out_of_range_are_refused(layers, bad):
    error = refusal(check_layers, layers, 2)
    assert (error.problem, error.title) == ("bad_parameter", "Invalid parameter")
    assert error.detail == f"layer {bad} is out of range: layers are 0 (embedding) to 2 (last block)"


def test_canonical_layers_make_the_default_and_all_explicit():
    assert canonical_layers(None, 12) == [12]
    assert canonical_layers("all", 2) == [0, 1, 2]
    assert canonical_layers([2, 0, 2], 2) == [0, 2]
    assert refusal(canonical_layers, [3], 2).detail.startswith("layer 3 is out of range")


def test_without_a_known_depth_layers_are_only_sorted():
    assert canonical_layers(None, None) is None
    assert canonical_layers([7, 3, 7], None) == [3, 7]
    error = refusal(canonical_layers, "all", None)
    assert error.detail == "this model's manifest does not give its depth: list the layers instead of 'all'"
    assert refusal(canonical_layers, "last", 2).detail == "layers 'last' are neither a list of layers nor 'all'"


# -- the canonical request ----------------------------------------------------------------------------


def test_equal_requests_become_equal():
    by_name = canonical_request({"targets": [" bag", "Coat"], "top_k": 7, "layers": [2, 0, 2]}, LABELS, 2)
    by_index = canonical_request({"targets": [8, 4], "layers": [0, 2]}, LABELS, 2)
    assert by_name == by_index == ExplainRequest(targets=[8, 4], top_k=DEFAULT_TOP_K, layers=[0, 2])


def test_the_defaults_are_made_explicit():
    assert canonical_request({}, LABELS, 2) == ExplainRequest(top_k=3, layers=[2])
    assert canonical_request({"targets": []}, LABELS, 2) == ExplainRequest(top_k=3, layers=[2])
    assert canonical_request({}, LABELS, None).layers is None


def test_top_k_is_at_most_the_number_of_classes():
    assert canonical_request({"top_k": 20}, LABELS, 2).top_k == 10
    assert canonical_request({"top_k": 2}, LABELS, 2).top_k == 2


def test_every_refused_parameter_is_listed():
    error = refusal(canonical_request, {"top_k": 0, "map_kind": "pretty", "colour": 1}, LABELS, 2)
    assert error.problem == "bad_parameter"
    assert error.extra["errors"] == error.detail.split("; ")
    assert [item.split(":")[0] for item in error.extra["errors"]] == ["top_k", "map_kind", "colour"]


def test_invalid_parameters_lists_each_error_where_it_is():
    with pytest.raises(ValidationError) as raised:
        ExplainRequest.model_validate({"layers": [0, "x"]})
    error = invalid_parameters(raised.value)
    assert error.detail.startswith("layers.1: ")
    assert error.extra == {"errors": [error.detail]}


# -- the exception itself, and where each caller meets it -------------------------------------------


def test_a_request_error_is_a_value_error_that_survives_pickling():
    error = RequestError("unknown_label", "no such label", "Unknown label", labels=["x"])
    copy = pickle.loads(pickle.dumps(error))
    assert isinstance(copy, ValueError)
    assert str(copy) == "no such label"
    assert (copy.problem, copy.detail, copy.title, copy.extra) == (
        "unknown_label",
        "no such label",
        "Unknown label",
        {"labels": ["x"]},
    )


@pytest.mark.parametrize(
    ("problem", "status"),
    [
        ("bad_parameter", 422),
        ("unknown_class", 422),
        ("too_many_targets", 422),
        ("unknown_label", 422),
        ("unsupported_model", 422),
        ("unknown_target", 404),
        ("no_map", 404),
        ("not_ready", 409),
        ("model_exists", 409),
        ("store_read_only", 409),
        ("expired", 410),
        ("unsupported_weights", 415),
    ],
)
def test_the_service_gives_each_request_problem_its_status(problem, status):
    answer = problem_for(RequestError(problem, "what to change", "A title", file="a.png"))
    assert answer.body() == {
        "type": f"urn:classlens:problem:{problem}",
        "title": "A title",
        "status": status,
        "detail": "what to change",
        "problem": problem,
        "file": "a.png",
    }


@pytest.mark.parametrize(
    ("lens", "rule", "arguments"),
    [
        (lens_resolve_targets, resolve_targets, ([True], LABELS)),
        (lens_resolve_targets, resolve_targets, ([*range(10), 0], LABELS)),
        (lens_resolve_targets, resolve_targets, (["Sandle"], LABELS)),
        (lens_check_layers, check_layers, ([3], 2)),
    ],
)
def test_the_lens_refuses_with_the_same_details(lens, rule, arguments):
    expected = refusal(rule, *arguments).detail
    with pytest.raises(ExplainError) as raised:
        lens(*arguments)
    assert str(raised.value) == expected


def test_the_lens_follows_the_same_rules():
    assert lens_resolve_targets([" bag ", 0], LABELS) == [8, 0]
    assert lens_check_layers([2, 0, 2], 2) == [0, 2]
