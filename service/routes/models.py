"""``/v1/models``: the catalog as clients need it to build requests (labels, grid, layers)."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify

from service.app import services
from service.model_info import detail, summary

blueprint = Blueprint("models", __name__, url_prefix="/v1/models")


@blueprint.get("")
def list_models() -> Response:
    catalog = services().catalog
    return jsonify({"models": [summary(entry, catalog) for entry in catalog.latest()]})


@blueprint.get("/<name>")
def get_model(name: str) -> Response:
    """``name`` (its newest version) or ``name@version``; an unknown one is a 404 problem."""
    catalog = services().catalog
    return jsonify(detail(catalog.resolve(name), catalog))
