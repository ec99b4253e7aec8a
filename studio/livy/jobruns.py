"""EMR Serverless's job run API over the service's batches: a Livy batch in an application IS a job
run, and these routes show it in EMR's shapes (``studio.livy.batches`` keeps the one record).

    POST   /applications/{application}/jobruns                      StartJobRun
    GET    /applications/{application}/jobruns                      ListJobRuns
    GET    /applications/{application}/jobruns/{job_run_id}         GetJobRun
    DELETE /applications/{application}/jobruns/{job_run_id}         CancelJobRun
    GET    /applications/{application}/jobruns/{job_run_id}/dashboard   GetDashboardForJobRun
    GET    /applications/{application}/jobruns/{job_run_id}/log     the driver's log as text

Field names are EMR's; times ISO 8601 in UTC; errors Livy's ``{"msg"}``. Access is that of batches
(``studio.livy.access``): the owner, view/modify users, admins; a list shows what the caller may
view. ``executionRoleArn`` is accepted and echoed, and means nothing here: a run runs as its owner.
"""

from __future__ import annotations

import re
from datetime import datetime, timezone
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.requests import Request
from starlette.responses import FileResponse, PlainTextResponse, Response
from starlette.routing import Route

from studio import audit
from studio.auth import quotas
from studio.errors import InvalidRequestError, NotFoundError
from studio.livy.access import Access, quota_overrides
from studio.livy.batches import DEFAULT_APPLICATION, Batch, BatchManager, JobRunState, check_conf_key, parse_submit_parameters
from studio.livy.models import CreateBatch
from studio.web import JSONResponse, parse_body, read_body

MAX_RESULTS = 50  # EMR's page size limit for ListJobRuns
MAX_TIMEOUT_MINUTES = 7 * 24 * 60  # EMR's longest executionTimeoutMinutes (a week)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SparkSubmit(_Strict):
    entryPoint: str
    entryPointArguments: list[str] = Field(default_factory=list)
    sparkSubmitParameters: str | None = None

    @field_validator("entryPointArguments", mode="before")
    @classmethod
    def _arguments(cls, value: Any) -> Any:
        if value is None:
            return []
        if isinstance(value, list) and all(isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in value):
            return [str(v) for v in value]
        raise ValueError("entryPointArguments must be a list of strings")


class JobDriver(_Strict):
    sparkSubmit: SparkSubmit


class Classification(_Strict):
    classification: str
    properties: dict[str, str] = Field(default_factory=dict)
    configurations: list[Any] = Field(default_factory=list)

    @field_validator("properties", mode="before")
    @classmethod
    def _strings(cls, value: Any) -> Any:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ValueError("properties must be an object of string values")
        return {str(k): ("true" if v is True else "false" if v is False else str(v)) for k, v in value.items()}


class ConfigurationOverrides(_Strict):
    applicationConfiguration: list[Classification] = Field(default_factory=list)
    monitoringConfiguration: dict[str, Any] | None = None


class StartJobRun(_Strict):
    jobDriver: JobDriver
    name: str | None = Field(None, max_length=256)
    clientToken: str | None = Field(None, min_length=1, max_length=64)
    executionRoleArn: str | None = Field(None, max_length=2048)
    configurationOverrides: ConfigurationOverrides | None = None
    executionTimeoutMinutes: float | None = Field(None, gt=0, le=MAX_TIMEOUT_MINUTES)
    tags: dict[str, str] = Field(default_factory=dict)


def _batches(request: Request) -> BatchManager:
    return request.app.state.batches


def _access(request: Request) -> Access:
    return request.app.state.access


async def _application(request: Request, start: bool = False) -> Any:
    """The application in the path (by id or name); ``start``: work arrives for it (auto-start, or 409
    naming its state). Without the applications registry there is one, ``default``."""
    key = request.path_params["application"]
    applications = getattr(request.app.state, "applications", None)
    if applications is None:
        if key != DEFAULT_APPLICATION:
            raise NotFoundError(f"Application '{key[:80]}' not found.")
        return None
    application = applications.get(key)
    if start:
        await applications.ensure_started(application)
    return application


def _quota(request: Request) -> Callable[[], None]:
    """429 when the caller already has as many live sessions and batches as its quota allows."""
    caller, state = request.user, request.app.state

    def check() -> None:
        in_use = state.sessions.held_by(caller.name) + state.batches.held_by(caller.name)
        quotas.check(state.settings, caller.name, caller.role, "sessions", in_use, quota_overrides(state.directory, caller.name))

    return check


async def _run(request: Request, modify: bool = False) -> Batch:
    application = await _application(request)
    key = request.path_params["job_run_id"]
    batch = _batches(request).get_run(application, key)
    _access(request).check(request.user, batch, f"job run '{key}'", modify)
    return batch


def _started(batch: Batch) -> dict[str, Any]:
    return {"applicationId": batch.application_id, "jobRunId": str(batch.id), "arn": batch.arn()}


def batch_body(body: StartJobRun, spark_user: str) -> tuple[CreateBatch, str | None]:
    """The Livy batch a StartJobRun asks for, and its Spark application name: the application's
    ``spark-defaults`` overrides, then ``sparkSubmitParameters`` (``--conf`` and options) over them."""
    conf: dict[str, str] = {}
    for part in (body.configurationOverrides.applicationConfiguration if body.configurationOverrides else []):
        if part.classification != "spark-defaults":
            raise InvalidRequestError(
                f"Rejected, Reason: configurationOverrides: classification '{part.classification[:80]}' is not supported "
                "(only spark-defaults)."
            )
        if part.configurations:
            raise InvalidRequestError("Rejected, Reason: configurationOverrides: spark-defaults takes properties, not nested configurations.")
        for key in part.properties:
            check_conf_key(key, "configurationOverrides")
        conf.update(part.properties)
    submit = body.jobDriver.sparkSubmit
    fields = parse_submit_parameters(submit.sparkSubmitParameters)
    conf.update(fields.pop("conf", {}))
    spark_name = fields.pop("sparkName", None) or body.name
    try:
        batch = CreateBatch.model_validate(
            {"file": submit.entryPoint, "args": submit.entryPointArguments, "conf": conf, "proxyUser": spark_user, **fields}
        )
    except ValidationError as exc:
        where = ", ".join(".".join(str(p) for p in error["loc"]) + ": " + error["msg"] for error in exc.errors()[:3])
        raise InvalidRequestError(f"Rejected, Reason: sparkSubmitParameters: {where}.") from None
    return batch, spark_name


async def start_job_run(request: Request) -> Response:
    body = parse_body(StartJobRun, await read_body(request))
    application = await _application(request, start=True)
    manager = _batches(request)
    if body.clientToken:  # the same token is the same run: a retried StartJobRun starts nothing new
        earlier = manager.by_token(application, body.clientToken)
        if earlier is not None:
            _access(request).check(request.user, earlier, f"job run '{earlier.id}'")
            return JSONResponse(_started(earlier))
    caller = str(request.user.name)
    create, spark_name = batch_body(body, _access(request).spark_user(request.user, None))
    batch = await manager.create(
        create,
        owner=caller,
        quota=_quota(request),
        application=application,
        job=body.model_dump(exclude_unset=True, exclude_none=True),  # echoed as the client gave it
        client_token=body.clientToken,
        spark_name=spark_name,
    )
    audit.note(
        request,
        target=f"/applications/{batch.application_id}/jobruns/{batch.id}",
        name=body.name,
        file=create.file,
        conf=create.conf or None,
    )
    return JSONResponse(_started(batch))


def _time_param(request: Request, name: str) -> float | None:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return None
    try:
        return float(raw)
    except ValueError:
        pass
    try:
        parsed = datetime.fromisoformat(re.sub(r"Z$", "+00:00", raw.strip()))
    except ValueError:
        raise InvalidRequestError(f"'{name}' must be an ISO 8601 time or epoch seconds, got '{raw[:40]}'.") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return parsed.timestamp()


async def list_job_runs(request: Request) -> Response:
    application = await _application(request)
    wanted: set[JobRunState] = set()
    for raw in request.query_params.getlist("states"):
        for name in raw.split(","):
            try:
                wanted.add(JobRunState(name.strip().upper()))
            except ValueError:
                known = ", ".join(s.value for s in JobRunState)
                raise InvalidRequestError(f"'states' must be job run states ({known}), got '{name[:40]}'.") from None
    after, before = _time_param(request, "createdAtAfter"), _time_param(request, "createdAtBefore")
    raw_max = request.query_params.get("maxResults") or str(MAX_RESULTS)
    if not raw_max.isdigit() or not 1 <= int(raw_max) <= MAX_RESULTS:
        raise InvalidRequestError(f"'maxResults' must be a whole number from 1 to {MAX_RESULTS}, got '{raw_max[:20]}'.")
    token = request.query_params.get("nextToken")
    if token is not None and not token.isdigit():
        raise InvalidRequestError("'nextToken' is not a token this service gave.")
    access, caller = _access(request), request.user
    manager = _batches(request)
    _, every = manager.list(0, len(manager.batches), lambda b: access.may_view(caller, b), application)
    runs = [
        b
        for b in reversed(every)  # newest first, as EMR lists them
        if (not wanted or b.run_state in wanted)
        and (after is None or b.created_at >= after)
        and (before is None or b.created_at <= before)
        and (token is None or b.id <= int(token))
    ]
    page = runs[: int(raw_max)]
    following = runs[int(raw_max)] if len(runs) > int(raw_max) else None
    return JSONResponse({"jobRuns": [b.summary_json() for b in page], "nextToken": str(following.id) if following else None})


async def get_job_run(request: Request) -> Response:
    return JSONResponse({"jobRun": (await _run(request)).job_json()})


async def cancel_job_run(request: Request) -> Response:
    batch = await _run(request, modify=True)
    await _batches(request).cancel(batch)
    return JSONResponse({"applicationId": batch.application_id, "jobRunId": str(batch.id)})


async def dashboard(request: Request) -> Response:
    """EMR's GetDashboardForJobRun: the live Spark UI while the run runs, else its driver log."""
    batch = await _run(request)
    if batch.run_state is JobRunState.RUNNING and batch.spark_ui_url:
        return JSONResponse({"url": batch.spark_ui_url})
    return JSONResponse({"url": f"{request.base_url}ui/batch/{batch.id}/log"})


async def driver_log(request: Request) -> Response:
    """The driver's log as text (the same file, with the same redactions, as the batch's driverLogUrl)."""
    batch = await _run(request)
    if not batch.log.path.is_file():
        return PlainTextResponse("")
    return FileResponse(batch.log.path, media_type="text/plain; charset=utf-8")


ROUTES = [
    Route("/applications/{application}/jobruns", start_job_run, methods=["POST"]),
    Route("/applications/{application}/jobruns", list_job_runs, methods=["GET"]),
    Route("/applications/{application}/jobruns/{job_run_id}", get_job_run, methods=["GET"]),
    Route("/applications/{application}/jobruns/{job_run_id}", cancel_job_run, methods=["DELETE"]),
    Route("/applications/{application}/jobruns/{job_run_id}/dashboard", dashboard, methods=["GET"]),
    Route("/applications/{application}/jobruns/{job_run_id}/log", driver_log, methods=["GET"]),
]
