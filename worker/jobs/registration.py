"""Registration jobs (POST /v1/models): register an uploaded model into the user's store root.

Not idempotent like the others (registering has an effect): a redelivered registration whose
first run put the version in place fails as "exists" unless it was sent with ``overwrite``.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from classlens.core.contract import TERMINAL_STATUSES, Job, ModelRegistration
from classlens.core.settings import Settings
from model_store.manifest import ManifestError
from model_store.sources import ModelSources, RegisterOptions
from worker.jobs.failures import InputExpired
from worker.jobs.runtime import Runtime
from worker.jobs.single import run_single
from worker.registration import RegistrationError, register


def upload_folder(settings: Settings, job_id: str) -> Path:
    """Where the API left the files of registration ``job_id`` (``data_dir`` is shared by API and workers)."""
    return settings.upload_dir / job_id


def model_add_job(rt: Runtime, job_id: str) -> Job | None:
    """Register the job's upload into the user's store root; its folder is removed whatever happens."""
    folder = upload_folder(rt.settings, job_id)
    job: Job | None = None
    try:
        job = run_single(
            rt, job_id, "registration", rt.settings.model_add_soft_time_limit_s, lambda job: _register(rt, job, folder)
        )
        return job
    finally:
        # Not while another live worker registers it (this is a second delivery): it still reads the files.
        if job is None or job.status in TERMINAL_STATUSES:
            shutil.rmtree(folder, ignore_errors=True)
        sweep_uploads(rt)


def _register(rt: Runtime, job: Job, folder: Path) -> bytes:
    if not folder.is_dir():
        raise InputExpired("the uploaded files are no longer there; upload the model again")
    options = RegisterOptions.model_validate(job.parameters["options"])
    try:
        sources = ModelSources.locate(folder)
    except ManifestError as error:  # no weights, or several: the upload's fault, said as registration says it
        raise RegistrationError(str(error)) from error
    entry = register(sources, options, rt.settings.user_model_dir)
    rt.models.catalog.refresh()  # this worker serves it from its next job on
    manifest = entry.manifest
    result = ModelRegistration(
        reference=manifest.reference,
        name=manifest.name,
        version=manifest.version,
        framework=manifest.framework,
        architecture=manifest.architecture,
        classes=manifest.labels.count,
        weights_sha256=manifest.weights.sha256,
        structure=None if manifest.structure is None else manifest.structure.model_dump(mode="json"),
        result_fingerprint=entry.result_fingerprint,
    )
    return result.model_dump_json().encode()


def sweep_uploads(rt: Runtime) -> None:
    """Remove upload folders whose job is gone or finished (their task never ran), once they are old.

    Old: untouched for longer than a registration may run, so that a folder the API is still
    writing (its job record comes after the files) is never taken.
    """
    root = rt.settings.upload_dir
    if not root.is_dir():
        return
    cutoff = time.time() - rt.settings.model_add_time_limit_s
    for folder in root.iterdir():
        try:
            if folder.stat().st_mtime > cutoff:
                continue
        except OSError:
            continue
        job = rt.jobs.get(folder.name)
        if job is None or job.status in TERMINAL_STATUSES:
            shutil.rmtree(folder, ignore_errors=True)
