"""Benchmarks of the lens, the analyses and the service.

Every benchmark runs the worker's code, so the package prepares the process as the worker
does before anything in it imports timm (:mod:`worker`: the torchvision compatibility step).
"""

import worker  # noqa: F401
