"""The `response` object of /v1/responses, whole or streamed as the Responses API's events.

A response's `output` is a `message` item holding one `output_text` part (left out when the model
only called functions), then one `function_call` item per call. Its `status` is "incomplete", with
`incomplete_details.reason` "max_output_tokens", when the token limit cut the output (the last
item's status too), else "completed". The request's settings are echoed as OpenAI echoes them.
Ids: the response's is "resp_" and the request's own suffix, its message's "msg_" and the same.

Streamed (`ResponsesStreamer`), every event is an SSE `event: <type>` line and its data, numbered by
`sequence_number` from 0: `response.created` and `response.in_progress` (the response, in progress,
no output yet); per item `response.output_item.added`, then for a message
`response.content_part.added`, `response.output_text.delta`s, `response.output_text.done`,
`response.content_part.done`, for a call `response.function_call_arguments.delta`(s) and `.done`,
and `response.output_item.done`; last `response.completed` (or `response.incomplete`, as OpenAI
ends a cut response) with the whole response, whose output is exactly the items streamed. Text
that may be the start of a stop string is held back until it is not.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from tokenmill.endpoints.base import Streamer, sse, usage
from tokenmill.outputs import CompletionOutput, RequestOutput

if TYPE_CHECKING:
    from tokenmill.endpoints.responses import ResponsesCall


def _suffix(request_id: str) -> str:
    return request_id.removeprefix("resp-")


def _status(completion: CompletionOutput) -> str:
    return "incomplete" if completion.finish_reason == "length" else "completed"


def response_usage(output: RequestOutput) -> dict[str, Any]:
    counts = usage([output])
    return {"input_tokens": counts["prompt_tokens"],
            # NOTE: nothing is written to a cache the client pays for: the prefix cache is the engine's.
            "input_tokens_details": {"cached_tokens": counts["prompt_tokens_details"]["cached_tokens"],
                                     "cache_write_tokens": 0},
            "output_tokens": counts["completion_tokens"], "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": counts["total_tokens"]}


def response_body(call: ResponsesCall, request_id: str, model: str, output: list[dict[str, Any]], status: str,
                  usage: dict[str, Any] | None) -> dict[str, Any]:
    """The response object; status "in_progress" (no output, no usage yet), "completed" or "incomplete"."""
    body, params = call.body, call.params
    text = body.get("text") or {}
    return {
        "id": f"resp_{_suffix(request_id)}", "object": "response", "created_at": call.created, "status": status,
        "completed_at": int(time.time()) if status == "completed" else None, "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "instructions": body.get("instructions"), "max_output_tokens": body.get("max_output_tokens"),
        "max_tool_calls": body.get("max_tool_calls"), "metadata": body.get("metadata") or {}, "model": model,
        "output": output, "parallel_tool_calls": body.get("parallel_tool_calls") is not False,
        "previous_response_id": None, "prompt_cache_key": body.get("prompt_cache_key"), "reasoning": None,
        "safety_identifier": body.get("safety_identifier"), "service_tier": "default",
        "temperature": params.temperature, "text": {"format": text.get("format") or {"type": "text"}},
        "tool_choice": body.get("tool_choice") or "auto", "tools": body.get("tools") or [], "top_p": params.top_p,
        "truncation": "disabled", "usage": usage, "user": body.get("user"),
    }


def text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def message_item(request_id: str, text: str | None, status: str) -> dict[str, Any]:
    """The output message; text None: its content part is not there yet (streamed)."""
    return {"id": f"msg_{_suffix(request_id)}", "type": "message", "role": "assistant", "status": status,
            "content": [] if text is None else [text_part(text)]}


def output_items(call: ResponsesCall, completion: CompletionOutput, request_id: str) -> tuple[list[dict[str, Any]],
                                                                                                str]:
    """A finished output's items and the response's status."""
    status = _status(completion)
    return [message_item(request_id, completion.text, status)], status


class ResponsesStreamer(Streamer):
    def __init__(self, call: ResponsesCall, request_id: str, model: str) -> None:
        self.call, self.request_id, self.model = call, request_id, model
        self.hold = max((len(s) for s in call.params.stop_strings), default=1) - 1  # type: ignore[union-attr]
        self.sent = 0  # characters of the output's text let out
        self.sequence = 0
        self.items: list[dict[str, Any]] = []  # streamed so far; the last one open until `open` is False
        self.open = False

    def event(self, kind: str, **data: Any) -> str:
        self.sequence += 1
        return sse({"type": kind, "sequence_number": self.sequence - 1, **data}, kind)

    def start(self) -> list[str]:
        snapshot = response_body(self.call, self.request_id, self.model, [], "in_progress", None)
        return [self.event("response.created", response=snapshot),
                self.event("response.in_progress", response=snapshot)]

    def update(self, index: int, output: RequestOutput) -> list[str]:
        (completion,) = output.outputs
        text = completion.text
        end = len(text) if completion.finished() else max(self.sent, len(text) - self.hold)
        delta, self.sent = text[self.sent:end], end
        return self.text(delta) if delta else []

    def text(self, delta: str) -> list[str]:
        """Events for more text of the message, opening it first if it is not open."""
        events = []
        if not (self.open and self.items[-1]["type"] == "message"):
            events += self.close("completed")
            item = message_item(self.request_id, None, "in_progress")
            self.items.append(item)
            self.open = True
            events += [self.event("response.output_item.added", output_index=len(self.items) - 1, item=item),
                       self.event("response.content_part.added", **self.where(), part=text_part(""))]
            item["content"].append(text_part(""))
        if delta:
            self.items[-1]["content"][0]["text"] += delta
            events.append(self.event("response.output_text.delta", **self.where(), delta=delta, logprobs=[]))
        return events

    def where(self) -> dict[str, Any]:
        """The open item's place, as its events name it."""
        where = {"output_index": len(self.items) - 1, "item_id": self.items[-1]["id"]}
        return {**where, "content_index": 0} if self.items[-1]["type"] == "message" else where

    def close(self, status: str) -> list[str]:
        """Events that end the open item, if one is, with `status`."""
        if not self.open:
            return []
        self.open = False
        item = self.items[-1]
        item["status"] = status
        events = []
        if item["type"] == "message":
            part = item["content"][0]
            events += [self.event("response.output_text.done", **self.where(), text=part["text"], logprobs=[]),
                       self.event("response.content_part.done", **self.where(), part=part)]
        else:
            events.append(self.event("response.function_call_arguments.done", **self.where(), name=item["name"],
                                     arguments=item["arguments"]))
        return [*events, self.event("response.output_item.done", output_index=len(self.items) - 1, item=item)]

    def finish(self, outputs: Sequence[RequestOutput]) -> list[str]:
        (output,) = outputs
        (completion,) = output.outputs
        status = _status(completion)
        events = [] if self.items else self.text("")  # an empty output is still a message
        events += self.close(status)
        body = response_body(self.call, self.request_id, self.model, self.items, status, response_usage(output))
        return [*events, self.event(f"response.{status}", response=body)]

    def error(self, error: dict[str, Any]) -> list[str]:
        detail = error["error"]
        return [self.event("error", code=detail.get("code"), message=detail.get("message"), param=detail.get("param"))]
