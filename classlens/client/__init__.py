"""The ClassLens client: the HTTP API from Python, synchronous, torch-free (docs/client.md).

    from classlens.client import Client

    with Client("http://127.0.0.1:8000") as lens:
        explanation = lens.explain("boot.png", "fmnist-vit", targets=["Ankle boot"])
        png = lens.map_png(lens.submit_explanation("boot.png", "fmnist-vit", wait_s=20), 9)

Only ``requests`` and the torch-free contract (:mod:`classlens.core.contract`) are needed:
``pip install 'classlens[client]'``.
"""

from classlens.client.client import Client, Job
from classlens.client.errors import ClassLensError, JobFailed, NotFound, RateLimited, Unauthorized, WaitTimeout
from classlens.client.inputs import InputError

__all__ = [
    "ClassLensError",
    "Client",
    "InputError",
    "Job",
    "JobFailed",
    "NotFound",
    "RateLimited",
    "Unauthorized",
    "WaitTimeout",
]
