"""The OpenAI Batch file format: one input line in, one output or error record out.

Each line is validated alone, its body by its endpoint (tokenmill/endpoints/); whatever is wrong
with it becomes a `LineError` naming the line and the field, and the job goes on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from tokenmill.endpoints import ENDPOINTS, URLS, Call, Endpoint
from tokenmill.errors import RequestError


class LineError(RequestError):
    """A `RequestError` of one input line, with the line's custom_id (None when it has no usable one)."""

    def __init__(self, code: str, message: str, custom_id: str | None = None, param: str | None = None) -> None:
        super().__init__(code, message, param)
        self.custom_id = custom_id


@dataclass
class BatchLine:
    line_no: int  # 1-based, in the input file
    custom_id: str
    url: str
    body: dict[str, Any]
    call: Call  # the body as its endpoint parsed it

    @property
    def endpoint(self) -> Endpoint:
        return ENDPOINTS[self.url]


def parse_line(text: str, line_no: int) -> BatchLine:
    """Validates one input line; raises LineError saying what is wrong, and on which line."""
    custom_id = None
    try:
        try:
            record = json.loads(text)
        except json.JSONDecodeError as e:
            raise LineError("invalid_json", f"not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(record, dict):
            raise LineError("invalid_request", "a line must be a JSON object")
        custom_id = record.get("custom_id")
        if not isinstance(custom_id, str) or not custom_id:
            custom_id = None
            raise LineError("missing_custom_id", "custom_id must be a non-empty string")
        if record.get("method") != "POST":
            raise LineError("invalid_method", f"method must be POST, got {record.get('method')!r}")
        url = record.get("url")
        if url not in ENDPOINTS:
            raise LineError("invalid_url", f"url must be one of {', '.join(URLS)}, got {url!r}")
        body = record.get("body")
        try:
            call = ENDPOINTS[url].parse(body)
        except RequestError as e:
            raise LineError(e.code, e.message, param=e.param) from None
        return BatchLine(line_no, custom_id, url, body, call)
    except LineError as e:
        e.message = f"line {line_no}: {e.message}"
        e.custom_id = custom_id
        raise


def output_record(record_id: str, line: BatchLine, request_id: str, body: dict[str, Any]) -> dict[str, Any]:
    """A line's record, with its endpoint's response body."""
    return {"id": record_id, "custom_id": line.custom_id,
            "response": {"status_code": 200, "request_id": request_id, "body": body},
            "error": None}


def error_record(record_id: str, error: LineError) -> dict[str, Any]:
    return {"id": record_id, "custom_id": error.custom_id,
            "response": {"status_code": 400, "request_id": None,
                         "body": {"error": {"message": error.message, "type": "invalid_request_error",
                                            "param": error.param, "code": error.code}}},
            "error": {"code": error.code, "message": error.message}}
