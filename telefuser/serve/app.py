"""The HTTP API: OpenAI's video endpoints over the job queue, built for one plan.

    POST   /v1/videos                 JSON, or multipart/form-data with the file `input_reference` (image-to-video)
    GET    /v1/videos                 list (after, limit, order)
    GET    /v1/videos/{id}            the job object
    GET    /v1/videos/{id}/content    the mp4
    DELETE /v1/videos/{id}            cancel (queued or running) and remove
    GET    /healthz                   liveness (never needs the key)
    GET    /metrics                   Prometheus text
    GET    /                          a page generated from the plan's Layer 3 (never needs the key)
    GET    /docs, /openapi.json       Swagger UI and the OpenAPI document (never need the key)

Errors come in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, so the `openai` client raises
its usual exceptions (422 UnprocessableEntityError, 429 RateLimitError, 401 AuthenticationError, ...).
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from typing import Any, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from telefuser.errors import ParameterError
from telefuser.schema.plan import Plan

from .jobs import JobManager, NotAccepting, QueueFull
from .params import IMAGE_FIELD, plan_name, request_model, resolve_request, takes_image

# Never behind the key. The page holds no data: it asks for the key and sends it on every call. The schema
# endpoints describe only this plan's Layer 3, which the page shows anyway, and a browser cannot send a header
# when it opens /docs: behind the key Swagger UI could not load. Its "Authorize" button sends the key on each
# call it tries (the document declares the bearer scheme when the service has a key).
OPEN_PATHS = ("/healthz", "/", "/docs", "/docs/oauth2-redirect", "/openapi.json")
MiB = 2**20


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 24 * MiB  # any request body (413 above)
    max_image_bytes: int = 16 * MiB  # the uploaded first frame (413 above)


class ApiError(HTTPException):
    def __init__(self, status: int, message: str, code: str, kind: str = "invalid_request_error",
                 param: Optional[str] = None, headers: Optional[dict] = None) -> None:
        super().__init__(status, message, headers=headers)
        self.code, self.kind, self.param = code, kind, param


def _error(status: int, message: str, code: str, kind: str = "invalid_request_error", param=None,
           headers: Optional[dict] = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status, headers=headers)


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes gets 413, by its Content-Length before anything is read,
    or when the bytes streamed in pass it."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        too_large = ApiError(413, f"the request body is over {self.limit:,} bytes, this service's limit "
                                  "(--max-body-mb); send a smaller image.", "body_too_large")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                declared = 0
            if declared > self.limit:
                response = _error(413, too_large.detail, too_large.code)
                return await response(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise too_large
            return message

        return await self.app(scope, limited, send)


class BearerAuth:
    """ASGI middleware: with an API key, every path but OPEN_PATHS needs `Authorization: Bearer KEY` (401)."""

    def __init__(self, app, key: Optional[str]) -> None:
        self.app, self.key = app, key

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or self.key is None or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        given = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), self.key.encode()):
            response = _error(401, "missing or wrong API key: send 'Authorization: Bearer KEY' with the key the "
                                   "service was started with (--api-key / TELEFUSER_API_KEY).", "invalid_api_key",
                              headers={"WWW-Authenticate": "Bearer"})
            return await response(scope, receive, send)
        return await self.app(scope, receive, send)


def create_app(plan: Plan, manager: JobManager, api_key: Optional[str] = None, limits: Limits = Limits()) -> FastAPI:
    """The service's ASGI app for one plan and its job manager (started and stopped by the caller)."""
    from .page import render_page

    name = plan_name(plan)
    json_model = request_model(plan)
    form_model = request_model(plan, multipart=True)
    content = {"application/json": {"schema": json_model.model_json_schema()},
               "multipart/form-data": {"schema": form_model.model_json_schema()}}
    if takes_image(plan):
        content = {"multipart/form-data": content["multipart/form-data"], "application/json": content["application/json"]}
    app = FastAPI(title=f"telefuser-serve: {name}",
                  description=f"Video generation with the TeleFuser plan {name!r} ({plan.pipeline_type}, plan hash "
                              f"{plan.plan_hash[:12]}). The request fields are the plan's Layer 3 parameters.",
                  version=plan.plan_hash[:12])
    app.state.manager = manager
    app.state.plan = plan
    if api_key is not None:
        _declare_bearer(app)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        if isinstance(exc, ApiError):
            return _error(exc.status_code, exc.detail, exc.code, exc.kind, exc.param, exc.headers)
        return _error(exc.status_code, str(exc.detail), "http_error", headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return _error(422, f"{where}: {first.get('msg', 'invalid value')}", "invalid_parameter")

    @app.post("/v1/videos", summary="Create a video job", openapi_extra={"requestBody": {"required": True,
                                                                                         "content": content}})
    async def create_video(request: Request) -> dict:
        fields, image, from_form = await _read_body(request, limits)
        try:
            job_request = await run_in_threadpool(resolve_request, plan, fields, image, from_form)
        except ParameterError as exc:
            raise ApiError(422, str(exc), "invalid_parameter") from exc
        try:
            job = manager.submit(job_request)
        except QueueFull as exc:
            raise ApiError(429, f"the queue is full ({manager.max_queue} jobs waiting, --max-queue); retry in "
                                f"{exc.retry_after} s.", "queue_full", kind="rate_limit_error",
                           headers={"Retry-After": str(exc.retry_after)}) from exc
        except NotAccepting as exc:
            raise ApiError(503, "the service is shutting down and takes no new jobs.", "shutting_down",
                           kind="server_error", headers={"Retry-After": "5"}) from exc
        return job.public()

    @app.get("/v1/videos", summary="List video jobs")
    async def list_videos(after: Optional[str] = None, limit: int = 20, order: str = "desc") -> dict:
        if order not in ("asc", "desc"):
            raise ApiError(422, f"order {order!r}: use 'asc' or 'desc'.", "invalid_parameter", param="order")
        limit = max(1, min(limit, 100))
        jobs, more = manager.list(after, limit, order)
        data = [j.public() for j in jobs]
        return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None, "has_more": more}

    def _job(video_id: str):
        job = manager.get(video_id)
        if job is None:
            raise ApiError(404, f"no video {video_id!r} (never created, deleted, or expired after --keep-seconds).",
                           "not_found", param="video_id")
        return job

    @app.get("/v1/videos/{video_id}", summary="Retrieve a video job")
    async def retrieve_video(video_id: str) -> JSONResponse:
        job = _job(video_id)
        headers = {"openai-poll-after-ms": "200"} if job.status in ("queued", "in_progress") else None
        return JSONResponse(job.public(), headers=headers)

    @app.get("/v1/videos/{video_id}/content", summary="Download the mp4", response_class=FileResponse)
    async def video_content(video_id: str, variant: str = "video"):
        job = _job(video_id)
        if variant != "video":
            raise ApiError(422, f"variant {variant!r} is not made by this service; it serves 'video' (the mp4).",
                           "invalid_parameter", param="variant")
        if job.status != "completed" or job.path is None or not job.path.is_file():
            raise ApiError(404, f"video {video_id!r} has no content: it is {job.status}.", "not_ready")
        return FileResponse(job.path, media_type="video/mp4", filename=f"{video_id}.mp4")

    @app.delete("/v1/videos/{video_id}", summary="Cancel and delete a video job")
    async def delete_video(video_id: str) -> dict:
        if not manager.delete(video_id):
            _job(video_id)
        return {"id": video_id, "object": "video.deleted", "deleted": True}

    @app.get("/healthz", summary="Liveness", openapi_extra={"security": []})
    async def healthz() -> JSONResponse:
        ok = manager.accepting
        return JSONResponse({"status": "ok" if ok else "stopping", "model": name, "queue_depth": manager.queue_depth()},
                            status_code=200 if ok else 503)

    @app.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse)
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(render_metrics(manager, name), media_type="text/plain; version=0.0.4")

    @app.get("/", summary="Web page", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(render_page(plan, key_required=api_key is not None))

    return BearerAuth(BodyLimit(app, limits.max_body_bytes), api_key)


def _declare_bearer(app: FastAPI) -> None:
    """The OpenAPI document says every operation (but /healthz) takes `Authorization: Bearer KEY`, so Swagger UI
    offers "Authorize" and sends the key with the calls it tries."""
    plain = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = plain()
            schema.setdefault("components", {})["securitySchemes"] = {
                "bearer": {"type": "http", "scheme": "bearer",
                           "description": "The key the service was started with (--api-key / TELEFUSER_API_KEY)."}}
            schema["security"] = [{"bearer": []}]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


async def _read_body(request: Request, limits: Limits) -> tuple[dict[str, Any], Optional[bytes], bool]:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype in ("multipart/form-data", "application/x-www-form-urlencoded"):
        try:
            form = await request.form(max_part_size=1 * MiB)
        except HTTPException:
            raise
        except Exception as exc:  # a malformed multipart body
            raise ApiError(422, f"the multipart/form-data body cannot be read ({exc}).", "invalid_body") from exc
        fields: dict[str, Any] = {}
        image = None
        try:
            for key, value in form.multi_items():
                if isinstance(value, UploadFile):
                    if key != IMAGE_FIELD:
                        raise ApiError(422, f"unexpected file field {key!r}; the first frame goes in "
                                            f"{IMAGE_FIELD!r}.", "invalid_parameter", param=key)
                    if value.size is not None and value.size > limits.max_image_bytes:
                        raise _image_too_large(limits)
                    image = await value.read(limits.max_image_bytes + 1)
                    if len(image) > limits.max_image_bytes:
                        raise _image_too_large(limits)
                elif key in fields:
                    raise ApiError(422, f"field {key!r} was given twice.", "invalid_parameter", param=key)
                else:
                    fields[key] = value
        finally:
            await form.close()
        return fields, image, True
    body = await request.body()
    try:
        data = json.loads(body or b"{}")
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(422, f"the body is not JSON ({exc}); send a JSON object, or multipart/form-data.",
                       "invalid_body") from exc
    if not isinstance(data, dict):
        raise ApiError(422, "the body must be a JSON object of the request's fields.", "invalid_body")
    return data, None, False


def _image_too_large(limits: Limits) -> ApiError:
    return ApiError(413, f"{IMAGE_FIELD} is over {limits.max_image_bytes:,} bytes, this service's limit "
                         "(--max-image-mb); send a smaller image (the frame is at most 1280x720).", "image_too_large",
                    param=IMAGE_FIELD)


def render_metrics(manager: JobManager, model: str) -> str:
    m = manager.metrics
    counts = manager.counts()
    lines = [
        "# HELP telefuser_queue_depth Jobs waiting to start.",
        "# TYPE telefuser_queue_depth gauge",
        f"telefuser_queue_depth {manager.queue_depth()}",
        "# HELP telefuser_jobs Jobs held now, by state.",
        "# TYPE telefuser_jobs gauge",
        *(f'telefuser_jobs{{state="{state}"}} {n}' for state, n in counts.items()),
    ]
    with m.lock:
        lines += [
            "# HELP telefuser_jobs_finished_total Jobs finished since start, by outcome.",
            "# TYPE telefuser_jobs_finished_total counter",
            *(f'telefuser_jobs_finished_total{{outcome="{o}"}} {m.finished.get(o, 0)}'
              for o in ("completed", "failed", "cancelled")),
            "# HELP telefuser_requests_rejected_total Submissions refused, by reason.",
            "# TYPE telefuser_requests_rejected_total counter",
            *(f'telefuser_requests_rejected_total{{reason="{r}"}} {m.rejected.get(r, 0)}'
              for r in ("queue_full", "shutting_down")),
            "# HELP telefuser_step_seconds Seconds per denoising step.",
            "# TYPE telefuser_step_seconds histogram",
        ]
        from .jobs import STEP_BUCKETS

        for bound, n in zip(STEP_BUCKETS, m.step_buckets):
            lines.append(f'telefuser_step_seconds_bucket{{le="{bound:g}"}} {n}')
        lines += [
            f'telefuser_step_seconds_bucket{{le="+Inf"}} {m.step_count}',
            f"telefuser_step_seconds_sum {m.step_sum:.6f}",
            f"telefuser_step_seconds_count {m.step_count}",
            "# HELP telefuser_job_seconds Seconds per completed job (queue wait excluded).",
            "# TYPE telefuser_job_seconds summary",
            f"telefuser_job_seconds_sum {m.job_seconds_sum:.6f}",
            f"telefuser_job_seconds_count {m.job_count}",
            "# HELP telefuser_peak_memory_bytes Highest peak memory of a job (GPU: max allocated; CPU: peak RSS).",
            "# TYPE telefuser_peak_memory_bytes gauge",
            f'telefuser_peak_memory_bytes{{kind="{m.peak_memory_kind or "none"}"}} {m.peak_memory_bytes}',
        ]
    lines += ["# HELP telefuser_info The plan served.", "# TYPE telefuser_info gauge",
              f'telefuser_info{{model="{model}"}} 1']
    return "\n".join(lines) + "\n"
