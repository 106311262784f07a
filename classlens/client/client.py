"""A synchronous client of the ClassLens HTTP API (openapi.yaml is the contract it follows).

Every piece of work is a job on the service: submitting answers the job (``202``, or ``200`` when
it is finished or cached), and the client long-polls ``GET`` on the job until it is finished.
Results are parsed into the contract's own types (:class:`~classlens.core.contract.Explanation`,
:class:`~classlens.core.contract.AuditResult`, :class:`~classlens.core.contract.AnalysisResult`),
so a caller reads the same fields the worker wrote. A ``429`` or ``503`` is retried after the
``Retry-After`` the service sends, a bounded number of times; every other error raises a
:class:`~classlens.client.errors.ClassLensError` with the problem's fields.
"""

from __future__ import annotations

import base64
import email.utils
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal, overload
from urllib.parse import quote

import requests

from classlens.client.errors import ClassLensError, JobFailed, RateLimited, WaitTimeout, error_for
from classlens.client.inputs import Body, Images, InputError, Labels, batch_body
from classlens.core.contract import (
    TERMINAL_STATUSES,
    AnalysisResult,
    AuditResult,
    Explanation,
    JobError,
    Progress,
)

# Where each kind of job lives, to find one by its id alone.
COLLECTIONS = {
    "explanation": "/v1/explanations",
    "audit": "/v1/audits",
    "analysis": "/v1/analyses",
    "model": "/v1/models/jobs",
}
# The longest long poll to ask for: the service caps ``wait`` itself (30 s by default).
LONGEST_POLL_S = 30.0

ImageInput = str | os.PathLike[str] | bytes | IO[bytes]
ProgressCallback = Callable[[int, int], None]


@dataclass(frozen=True)
class Job:
    """A job as the API shows it (``ExplanationJob``, ``AuditJob``, ``AnalysisJob`` or ``ModelJob``).

    ``data`` is the whole JSON object; the typed accessors parse ``result`` into the contract's models.
    """

    id: str
    kind: str
    status: str
    model: str
    parameters: dict[str, Any]
    progress: Progress
    error: JobError | None
    cached: bool
    links: dict[str, Any]
    result: dict[str, Any] | None
    data: dict[str, Any]

    @classmethod
    def from_api(cls, data: Mapping[str, Any]) -> Job:
        error = data.get("error")
        return cls(
            id=str(data["id"]),
            kind=str(data["kind"]),
            status=str(data["status"]),
            model=str(data.get("model", "")),
            parameters=dict(data.get("parameters") or {}),
            progress=Progress.model_validate(data.get("progress") or {"done": 0, "total": 1}),
            error=JobError.model_validate(error) if error else None,
            cached=bool(data.get("cached", False)),
            links=dict(data.get("links") or {}),
            result=data.get("result"),
            data=dict(data),
        )

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL_STATUSES

    @property
    def succeeded(self) -> bool:
        return self.status == "succeeded"

    def _result(self) -> dict[str, Any]:
        if self.result is None:
            raise ClassLensError("No result", f"{self.kind} {self.id} is {self.status}: it has no result (yet)")
        return self.result

    def explanation(self) -> Explanation:
        """The result of a succeeded explanation job."""
        return Explanation.model_validate(self._result())

    def audit_result(self) -> AuditResult:
        """The result of a succeeded audit: its rows and aggregates."""
        return AuditResult.model_validate(self._result())

    def analysis_result(self) -> AnalysisResult:
        """The result of a succeeded analysis: its numbers and the names of its figures."""
        return AnalysisResult.model_validate(self._result())


def _retry_after(value: str | None) -> float | None:
    """``Retry-After`` in seconds: a number, or an HTTP date (RFC 9110 allows both)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _image_bytes(image: ImageInput) -> bytes:
    if isinstance(image, (bytes, bytearray)):
        return bytes(image)
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise InputError(f"{path}: no such image file")
        return path.read_bytes()
    return image.read()


def _job_id(job: Job | str) -> str:
    return job.id if isinstance(job, Job) else job


class Client:
    """The ClassLens API at ``url`` (``http://127.0.0.1:8000`` for ``classlens serve``).

    ``api_key`` is sent as ``Authorization: Bearer``; ``timeout`` bounds each HTTP request (a long
    poll adds its wait). A ``429`` or ``503`` is tried again up to ``retries`` times, after the
    ``Retry-After`` the service asks for when it is at most ``max_retry_wait_s``.
    """

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        timeout: float = 60.0,
        *,
        retries: int = 3,
        max_retry_wait_s: float = 60.0,
        session: requests.Session | None = None,
    ):
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.retries = retries
        self.max_retry_wait_s = max_retry_wait_s
        self.session = session or requests.Session()
        if api_key:
            self.session.headers["Authorization"] = f"Bearer {api_key}"

    def close(self) -> None:
        self.session.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # -- HTTP -------------------------------------------------------------------------------------------

    def _request(self, method: str, path: str, *, wait_s: float = 0.0, **options: Any) -> requests.Response:
        """One call, with the bounded retries of 429 and 503; a 4xx or 5xx answer raises ClassLensError."""
        attempt = 0
        while True:
            try:
                response = self.session.request(
                    method, self.url + path, timeout=self.timeout + wait_s, allow_redirects=False, **options
                )
            except requests.RequestException as unreachable:
                detail = f"{method} {self.url}{path}: {unreachable}"
                raise ClassLensError("Cannot reach the service", detail) from unreachable
            if response.status_code < 400:
                return response
            retry_after = _retry_after(response.headers.get("Retry-After"))
            error = error_for(response.status_code, self._problem(response), retry_after)
            retryable = isinstance(error, RateLimited) and attempt < self.retries
            if not retryable or (retry_after is not None and retry_after > self.max_retry_wait_s):
                raise error
            attempt += 1
            time.sleep(retry_after if retry_after is not None else min(2.0**attempt, self.max_retry_wait_s))

    @staticmethod
    def _problem(response: requests.Response) -> dict[str, Any]:
        try:
            body = response.json()
        except ValueError:
            body = None
        if isinstance(body, dict):
            return body
        return {"title": response.reason or f"HTTP {response.status_code}", "detail": response.text[:500]}

    def _json(self, method: str, path: str, **options: Any) -> Any:
        return self._request(method, path, **options).json()

    def _submit(self, path: str, body: Body, wait_s: float) -> Job:
        """POST a job (JSON or multipart) and answer it, finished when the service could do it within ``wait_s``."""
        query = f"?wait={wait_s:g}" if wait_s > 0 else ""
        options: dict[str, Any] = {"json": body.json}
        if body.json is None:
            options = {"files": body.files, "data": body.data}
        return Job.from_api(self._json("POST", path + query, wait_s=wait_s, **options))

    # -- jobs -------------------------------------------------------------------------------------------

    def job(self, id: str, kind: str = "explanation") -> Job:
        """The job ``id`` of ``kind`` (``explanation``, ``audit``, ``analysis`` or ``model``) as it is now."""
        if kind not in COLLECTIONS:
            raise ValueError(f"kind is one of {', '.join(COLLECTIONS)}, not {kind!r}")
        return Job.from_api(self._json("GET", f"{COLLECTIONS[kind]}/{quote(id, safe='')}"))

    def wait(
        self,
        job: Job,
        timeout: float | None = None,
        progress: ProgressCallback | None = None,
        poll_s: float | None = None,
    ) -> Job:
        """Long-poll ``job`` until it is finished; the succeeded job, or :class:`JobFailed`.

        ``progress(done, total)`` is called with the job's progress each time it is read. The service
        answers a long poll early only when the job finishes, so with a callback the polls are short
        (``poll_s``, 1 s by default) for the progress to move; without one they are long.
        ``timeout`` (seconds, None: no limit) raises :class:`WaitTimeout`; the job goes on running.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        step = poll_s if poll_s is not None else (1.0 if progress else LONGEST_POLL_S)
        path = job.links.get("self") or f"{COLLECTIONS[job.kind]}/{job.id}"
        while True:
            if progress is not None:
                progress(job.progress.done, job.progress.total)
            if job.finished:
                break
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise WaitTimeout("Still running", f"{job.kind} {job.id} was {job.status} after {timeout:g} s", job=job)
            wait_s = min(step, LONGEST_POLL_S, remaining if remaining is not None else step)
            job = Job.from_api(self._json("GET", f"{path}?wait={max(wait_s, 0.0):g}", wait_s=wait_s))
        if job.status != "succeeded":
            error = job.error or JobError(title="Job failed", detail=f"{job.kind} {job.id} failed")
            raise JobFailed(error.title, error.detail, job=job, problem="job_failed", body=job.data)
        return job

    # -- explanations -----------------------------------------------------------------------------------

    def submit_explanation(self, image: ImageInput, model: str, *, wait_s: float = 0.0, **params: Any) -> Job:
        """Queue the explanation of ``image`` (a path, bytes or a binary file) by ``model``; the job.

        ``params`` are the fields of ``ExplainJsonRequest`` (``targets``, ``top_k``, ``layers``,
        ``map_kind``, ``sublayers``, ``gradient_map``, ``norm``, ``bias``, ``baseline_maps``,
        ``token_classes``); None leaves a field out (the service's default).
        """
        body = {"image": base64.b64encode(_image_bytes(image)).decode("ascii"), "model": model}
        body |= {name: value for name, value in params.items() if value is not None}
        return self._submit("/v1/explanations", Body(json=body), wait_s)

    @overload
    def explain(
        self, image: ImageInput, model: str, *, wait: Literal[True] = True, timeout: float | None = ..., **params: Any
    ) -> Explanation: ...

    @overload
    def explain(
        self, image: ImageInput, model: str, *, wait: Literal[False], timeout: float | None = ..., **params: Any
    ) -> Job: ...

    def explain(
        self, image: ImageInput, model: str, *, wait: bool = True, timeout: float | None = 300.0, **params: Any
    ) -> Explanation | Job:
        """Explain ``image`` with ``model``: the :class:`Explanation` (``wait=False``: the queued job)."""
        if not wait:
            return self.submit_explanation(image, model, **params)
        job = self.submit_explanation(image, model, wait_s=min(LONGEST_POLL_S, timeout or LONGEST_POLL_S), **params)
        return self.wait(job, timeout).explanation()

    def map_png(self, job: Job | str, target: int | str, layer: int | None = None, kind: str | None = None) -> bytes:
        """A target's map over the image as PNG bytes (``kind``: projection, gradient, chefer, rollout, gradcam).

        A label name is turned into its class index from the job's result when the job is at hand,
        so that names with a ``/`` work too.
        """
        if isinstance(job, Job) and isinstance(target, str) and job.result:
            for explained in job.result.get("targets", []):
                if str(explained.get("label", "")).strip().casefold() == target.strip().casefold():
                    target = int(explained["index"])
                    break
        query = {name: value for name, value in (("layer", layer), ("kind", kind)) if value is not None}
        path = f"/v1/explanations/{quote(_job_id(job), safe='')}/maps/{quote(str(target), safe='')}.png"
        return self._request("GET", path, params=query).content

    def input_png(self, job: Job | str) -> bytes:
        """The image as the model saw it (after resize and crop), as PNG bytes."""
        return self._request("GET", f"/v1/explanations/{quote(_job_id(job), safe='')}/input.png").content

    # -- audits and analyses ------------------------------------------------------------------------------

    def submit_audit(
        self,
        images: Images,
        model: str,
        *,
        labels: Labels | None = None,
        targets: list[int | str] | None = None,
        top_k: int | None = None,
        layers: list[int] | str | None = None,
    ) -> Job:
        """Queue an audit of ``images`` (a folder, a zip file or its bytes, or a list of images); the job.

        ``labels``: for a folder or zip, a labels.csv file (columns ``file`` and ``label``, names
        relative to the folder or the zip's root) or a mapping of file name to label; for a list,
        a mapping or one label per image. A folder's own labels.csv is used when none is given.
        """
        parameters = {"targets": targets, "top_k": top_k, "layers": layers}
        return self._submit("/v1/audits", batch_body(model, images, labels, parameters), 0.0)

    def audit(
        self,
        images: Images,
        model: str,
        *,
        labels: Labels | None = None,
        targets: list[int | str] | None = None,
        top_k: int | None = None,
        layers: list[int] | str | None = None,
        timeout: float | None = None,
        progress: ProgressCallback | None = None,
    ) -> Job:
        """Audit ``images`` with ``model`` (see :meth:`submit_audit`) and wait: the succeeded audit job.

        ``progress(done, total)`` follows the images explained so far; ``job.audit_result()`` is
        the typed result, :meth:`rows_csv` and :meth:`report_json` its downloads.
        """
        job = self.submit_audit(images, model, labels=labels, targets=targets, top_k=top_k, layers=layers)
        return self.wait(job, timeout, progress)

    def rows_csv(self, audit: Job | str) -> str:
        """The audit's rows as CSV text (one line per image), as ``GET /v1/audits/{id}/rows.csv`` writes them."""
        response = self._request("GET", f"/v1/audits/{quote(_job_id(audit), safe='')}/rows.csv")
        response.encoding = "utf-8"
        return response.text

    def report_json(self, audit: Job | str) -> bytes:
        """The audit's result as the JSON bytes ``GET /v1/audits/{id}/report.json`` sends."""
        return self._request("GET", f"/v1/audits/{quote(_job_id(audit), safe='')}/report.json").content

    def analysis(
        self,
        kind: str,
        model: str,
        images: Images,
        *,
        labels: Labels | None = None,
        wait: bool = True,
        timeout: float | None = None,
        progress: ProgressCallback | None = None,
        **params: Any,
    ) -> Job:
        """Run the ``kind`` analysis of ``model`` over ``images`` (as for audits; at least 4); the job.

        ``params`` are the other fields of ``AnalysisJsonRequest`` (``compare_to``, ``representation``,
        ``batch_size``, ``region``, ``layer``...). With ``wait`` the job is followed until it has
        succeeded; ``job.analysis_result()`` is then its result and :meth:`figure_png` its figures.
        """
        body = batch_body(model, images, labels, {"kind": kind, **params})
        job = self._submit("/v1/analyses", body, 0.0)
        return self.wait(job, timeout, progress) if wait else job

    def figure_png(self, analysis: Job | str, name: str) -> bytes:
        """One figure of a succeeded analysis (a name of its result's ``figures``) as PNG bytes."""
        path = f"/v1/analyses/{quote(_job_id(analysis), safe='')}/figures/{quote(name, safe='')}.png"
        return self._request("GET", path).content

    # -- models and health --------------------------------------------------------------------------------

    def models(self, include_disabled: bool = False) -> list[dict[str, Any]]:
        """The newest enabled version of every model (``ModelSummary`` objects)."""
        params = {"include_disabled": "true"} if include_disabled else {}
        return list(self._json("GET", "/v1/models", params=params)["models"])

    def model(self, name: str) -> dict[str, Any]:
        """One model (``name`` or ``name@version``) with its labels (``ModelDetail``); :class:`NotFound` if none."""
        return dict(self._json("GET", f"/v1/models/{quote(name, safe='@')}"))

    def ready(self) -> bool:
        """Whether the service is ready (store reachable, catalog loaded, a worker alive): ``GET /readyz``."""
        try:
            return self.session.get(self.url + "/readyz", timeout=self.timeout).status_code == 200
        except requests.RequestException:
            return False
