"""`tokenmill serve`: an OpenAI-compatible HTTP API over the shared engine thread.

Every endpoint (tokenmill/endpoints/) is served by one handler: the body parsed and prepared by
its endpoint, its k prompts (one, or an embeddings or completions request's list) submitted as k
engine requests at interactive priority through a `ThreadClient` of the shared engine thread, and
answered together. Streamed ones are sent as server-sent events as the engine produces tokens. A
client that disconnects, streamed or not, has its requests aborted at once (their KV blocks
freed). Errors have OpenAI's shape and status codes: a request's own fault is a 400 naming its
code and field (an endpoint the loaded model cannot serve included), a failure inside the engine
a 500 `server_error`.

At `/`, a page of the batches (static/: plain HTML, CSS and JavaScript, served as they are). The
page and its files need no key; the API under /v1 they call does, with `--api-key`.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from tokenmill.endpoints import ENDPOINTS, Endpoint, Streamer, check_task
from tokenmill.engine.client import ThreadClient
from tokenmill.engine.threaded import EngineThread
from tokenmill.errors import RequestError
from tokenmill.outputs import EngineOutput, RequestOutput
from tokenmill.server.batches import BatchError, BatchManager
from tokenmill.server.metrics import metrics_registry
from tokenmill.server.store import Store

MAX_JSON_BYTES = 16 << 20
MAX_FILE_BYTES = 200 << 20  # as OpenAI's batch input limit
INTERACTIVE_PRIORITY = 0  # batches run at BATCH_PRIORITY (1): admitted after, preempted first
STATIC_DIR = Path(__file__).parent / "static"
# The page keeps the API key: it runs its own files and nothing else, and no other site may frame it.
PAGE_POLICY = "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'"


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    @classmethod
    def of_request(cls, error: RequestError, endpoint: Endpoint) -> APIError:
        """A failed request's error: 500 for a failure inside the engine, else 400 naming the field."""
        if error.internal:
            return cls(500, error.message, "server_error", None, error.code)
        return cls(400, error.message, "invalid_request_error", endpoint.blamed_param(error.param), error.code)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


async def until_gone(request: Request) -> None:
    """Returns once the client of a request whose body has been read disconnects."""
    # NOTE: not `request.is_disconnected()`, which never sees the disconnect through the
    # middleware's receive; after the body, receive() waits for the disconnect itself.
    while (await request.receive())["type"] != "http.disconnect":
        pass


def create_app(engine_thread: EngineThread, store: Store, batches: BatchManager, api_key: str | None) -> FastAPI:
    app = FastAPI(title="tokenmill", docs_url=None, redoc_url=None)
    frontend = engine_thread.frontend
    model_name = frontend.model_name
    registry, latency = metrics_registry(engine_thread, batches)

    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError) -> JSONResponse:
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        param = ".".join(str(x) for x in first.get("loc", ())[1:]) or None
        return error_response(APIError(400, f"invalid request: {param or 'body'}: {first.get('msg', 'invalid')}",
                                       param=param))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        return error_response(APIError(e.status_code, str(e.detail), "invalid_request_error" if e.status_code < 500
                                       else "server_error"))

    @app.middleware("http")
    async def guard(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        if request.url.path.startswith("/v1/") and api_key is not None:
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return error_response(APIError(401, "missing or wrong API key", "authentication_error",
                                               code="invalid_api_key"))
        limit = MAX_FILE_BYTES + (1 << 20) if request.url.path == "/v1/files" else MAX_JSON_BYTES
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return error_response(APIError(413, f"request body larger than {limit} bytes", code="request_too_large"))
        return await call_next(request)

    async def json_body(request: Request) -> dict[str, Any]:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise APIError(400, "the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        return body

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type="text/plain; version=0.0.4")

    # -- the batches page
    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers={"Content-Security-Policy": PAGE_POLICY})

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "tokenmill", "quantization": frontend.quantization}]}

    def check_model(body: dict[str, Any], endpoint: Endpoint) -> None:
        if body.get("model") != model_name:
            raise APIError(404, f"model {body.get('model')!r} not found; this server runs {model_name!r}",
                           param="model", code="model_not_found")
        try:
            check_task(frontend, endpoint)
        except RequestError as e:
            raise APIError.of_request(e, endpoint) from None

    async def serve(request: Request, endpoint: Endpoint) -> Response:
        body = await json_body(request)
        check_model(body, endpoint)
        request_id = f"{endpoint.id_prefix}-{secrets.token_hex(12)}"
        try:
            call = endpoint.parse(body)
            await asyncio.to_thread(endpoint.prepare, frontend, call)
            streamer = endpoint.streamer(call, request_id, model_name) if endpoint.streams(call) else None
        except RequestError as e:
            raise APIError.of_request(e, endpoint) from None
        count = len(call.prompts)
        ids = [request_id] if count == 1 else [f"{request_id}-{i}" for i in range(count)]
        index = {one_id: i for i, one_id in enumerate(ids)}
        arrived: asyncio.Queue[EngineOutput] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        client = ThreadClient(engine_thread, INTERACTIVE_PRIORITY,
                              sink=lambda out: loop.call_soon_threadsafe(arrived.put_nowait, out))
        for one_id, (text, token_ids) in zip(ids, call.prompts):
            client.add(one_id, text, token_ids, call.params, stream=streamer is not None)
        latest: list[EngineOutput | None] = [None] * count  # each prompt's newest output

        async def receive(until: Callable[[], bool]) -> None:
            while not until():
                output = await arrived.get()
                latest[index[output.request_id]] = output
                latency.observe(output, "interactive")

        def unfinished() -> list[str]:
            return [one_id for one_id, o in zip(ids, latest) if o is None or not o.finished]

        def answerable() -> bool:
            # NOTE: a stream starts once every prompt has its first output, so that a request that
            # cannot run gets its status code (400 or 500) as a non-streamed one does.
            if any(o is not None and o.error is not None for o in latest):
                return True
            return not unfinished() or (streamer is not None and all(o is not None for o in latest))

        receiving = asyncio.ensure_future(receive(answerable))
        client_gone = asyncio.ensure_future(until_gone(request))
        handed_over = False
        try:
            # NOTE: a non-streamed handler is not cancelled when its client leaves: this notices, so
            # that a request does not run on for nobody.
            await asyncio.wait((receiving, client_gone), return_when=asyncio.FIRST_COMPLETED)
            if not receiving.done():
                return Response(status_code=499)  # nobody reads it
            error = endpoint.failure(latest)
            if error is not None:
                raise APIError.of_request(error, endpoint)
            if streamer is None:
                return JSONResponse(endpoint.respond(call, [o for o in latest if o is not None], request_id,
                                                     model_name))
            handed_over = True  # the stream aborts what is left if its client leaves
            return StreamingResponse(stream_events(endpoint, streamer, client, ids, latest, receive),
                                     media_type="text/event-stream")
        finally:
            receiving.cancel()
            client_gone.cancel()
            if not handed_over:
                for one_id in unfinished():
                    client.abort(one_id)

    async def stream_events(endpoint: Endpoint, streamer: Streamer, client: ThreadClient, ids: list[str],
                            latest: list[EngineOutput | None],
                            receive: Callable[[Callable[[], bool]], Awaitable[None]]) -> AsyncIterator[str]:
        reported: list[EngineOutput | None] = [None] * len(ids)
        try:
            for event in streamer.start():
                yield event
            while True:
                for i, output in enumerate(latest):
                    if output is reported[i] or output is None:
                        continue
                    reported[i] = output
                    if output.error is not None:  # failed mid-stream, inside the engine
                        for event in streamer.error(APIError.of_request(output.error, endpoint).body()):
                            yield event
                        return
                    assert isinstance(output, RequestOutput)
                    for event in streamer.update(i, output):
                        yield event
                if all(o is not None and o.finished for o in latest):
                    break
                await receive(lambda: any(o is not r for o, r in zip(latest, reported)))
            for event in streamer.finish([o for o in latest if isinstance(o, RequestOutput)]):
                yield event
        finally:
            for one_id, output in zip(ids, latest):
                if output is None or not output.finished:  # the client left mid-stream: free its KV now
                    client.abort(one_id)

    def route(endpoint: Endpoint) -> Callable[[Request], Awaitable[Response]]:
        async def handle(request: Request) -> Response:
            return await serve(request, endpoint)
        return handle

    for url, endpoint in ENDPOINTS.items():
        app.add_api_route(url, route(endpoint), methods=["POST"])

    # -- files
    @app.post("/v1/files")
    async def upload_file(request: Request) -> dict[str, Any]:
        form = await request.form(max_part_size=MAX_FILE_BYTES)
        upload, purpose = form.get("file"), form.get("purpose")
        if not isinstance(upload, UploadFile) and not hasattr(upload, "read"):
            raise APIError(400, "a multipart field 'file' is required", param="file")
        if purpose != "batch":
            raise APIError(400, f"purpose must be 'batch', got {purpose!r}", param="purpose")

        async def chunks() -> AsyncIterator[bytes]:
            while piece := await upload.read(1 << 20):
                yield piece

        try:
            return await store.create_file(upload.filename or "upload.jsonl", purpose, chunks(), MAX_FILE_BYTES)
        except ValueError as e:
            raise APIError(413, str(e), param="file", code="file_too_large") from None

    def file_or_404(file_id: str) -> tuple[dict[str, Any], Any]:
        found = store.get_file(file_id)
        if found is None:
            raise APIError(404, f"no file with id {file_id!r}", param="file_id", code="file_not_found")
        return found

    @app.get("/v1/files")
    async def list_files(purpose: str | None = None) -> dict[str, Any]:
        return {"object": "list", "data": store.list_files(purpose), "has_more": False}

    @app.get("/v1/files/{file_id}")
    async def get_file(file_id: str) -> dict[str, Any]:
        return file_or_404(file_id)[0]

    @app.get("/v1/files/{file_id}/content")
    async def file_content(file_id: str) -> Response:
        return FileResponse(file_or_404(file_id)[1], media_type="application/octet-stream")

    @app.delete("/v1/files/{file_id}")
    async def delete_file(file_id: str) -> dict[str, Any]:
        if not store.delete_file(file_id):
            file_or_404(file_id)
        return {"id": file_id, "object": "file", "deleted": True}

    # -- batches
    def batch_or_404(batch: dict[str, Any] | None, batch_id: str) -> dict[str, Any]:
        if batch is None:
            raise APIError(404, f"no batch with id {batch_id!r}", param="batch_id", code="batch_not_found")
        return batch

    @app.post("/v1/batches")
    async def create_batch(request: Request) -> dict[str, Any]:
        body = await json_body(request)
        try:
            return batches.create(body.get("input_file_id"), body.get("endpoint"), body.get("completion_window"),
                                  body.get("metadata"))
        except BatchError as e:
            raise APIError(e.status, str(e), param=e.param) from None

    @app.get("/v1/batches/{batch_id}")
    async def get_batch(batch_id: str) -> dict[str, Any]:
        return batch_or_404(batches.get(batch_id), batch_id)

    @app.post("/v1/batches/{batch_id}/cancel")
    async def cancel_batch(batch_id: str) -> dict[str, Any]:
        return batch_or_404(batches.cancel(batch_id), batch_id)

    @app.get("/v1/batches")
    async def list_batches(after: str | None = None, limit: int = 20) -> dict[str, Any]:
        if not 1 <= limit <= 100:
            raise APIError(400, "limit must be between 1 and 100", param="limit")
        everything = batches.list()  # newest first
        ids = [b["id"] for b in everything]
        if after is not None and after not in ids:  # not a silent restart from the first page
            raise APIError(404, f"no batch with id {after!r}", param="after", code="batch_not_found")
        start = 0 if after is None else ids.index(after) + 1
        page = everything[start:start + limit]
        return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None, "has_more": start + limit < len(everything)}

    return app
