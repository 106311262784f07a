"""The benchmarks behind `classlens bench`, `bench-service` and `evaluate` (an entry point: may import every layer).

Importing :mod:`worker` first applies its torchvision compatibility step, which timm needs on CPU machines.
"""

import worker  # noqa: F401  (before any timm import)
