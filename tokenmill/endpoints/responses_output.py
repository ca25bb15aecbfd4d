"""The `response` object of /v1/responses, streamed as the Responses API's events or whole.

A response's `output` holds items in the order the model wrote them: a `message` with one
`output_text` part for its text, a `function_call` item per call (tokenmill/tools/ reads them from
the text when the request has tools; a reply that only calls functions has no message). Its
`status` is "incomplete", with `incomplete_details.reason` "max_output_tokens", when the token
limit cut the output (a message it cut is too; a call is only ever given whole), else
"completed". The request's settings are echoed as OpenAI echoes them. Ids: the response's "resp_"
and the request's own suffix; its message's "msg_" and the same (and "_<output index>" after the
first item); a call's "fc_" and its call_id's suffix.

Streamed (`ResponsesStreamer`), every event is an SSE `event: <type>` line with its data, numbered
by `sequence_number` from 0: `response.created` and `response.in_progress` (the response in
progress, without output); per item `response.output_item.added`, then for a message
`response.content_part.added`, `response.output_text.delta`s, `response.output_text.done` and
`response.content_part.done`, for a call `response.function_call_arguments.delta` and `.done`;
then `response.output_item.done`; last `response.completed`, or `response.incomplete` as OpenAI
ends a cut response, with the whole response, its output exactly the items streamed. Text that may
be the start of a stop string is held back until it is not. The non-streamed response is built by
the same streamer (`whole_response`), so the two agree item for item.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from tokenmill.endpoints.base import Streamer, sse, usage
from tokenmill.outputs import RequestOutput
from tokenmill.tools import ToolCallStream

if TYPE_CHECKING:
    from tokenmill.endpoints.responses import ResponsesCall


def _suffix(request_id: str) -> str:
    return request_id.removeprefix("resp-")


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


class ResponsesStreamer(Streamer):
    def __init__(self, call: ResponsesCall, request_id: str, model: str) -> None:
        self.call, self.request_id, self.model = call, request_id, model
        self.hold = max((len(s) for s in call.params.stop_strings), default=1) - 1  # type: ignore[union-attr]
        self.sent = 0  # characters of the output's text let out
        self.sequence = 0
        self.items: list[dict[str, Any]] = []  # so far; the last one is open while `open`
        self.open = False
        self.tool_calls: ToolCallStream | None = None
        if call.tools is not None:
            assert call.tool_format is not None
            self.tool_calls = ToolCallStream(call.tool_format, call.tools)
        self.response: dict[str, Any] | None = None  # the whole response, once finished

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
        if self.tool_calls is None:
            return self.text(delta) if delta else []
        return self.chat_deltas(self.tool_calls.feed(delta))

    def chat_deltas(self, deltas: list[dict[str, Any]]) -> list[str]:
        """Events for the tool parser's chat-shaped deltas: content, a call's start, its arguments."""
        events = []
        for delta in deltas:
            if "content" in delta:
                events += self.text(delta["content"])
                continue
            (call,) = delta["tool_calls"]
            if "id" in call:  # a new call: a new item
                events += self.close("completed")
                events += self.add({"id": f"fc_{call['id'].removeprefix('call_')}", "type": "function_call",
                                    "status": "in_progress", "call_id": call["id"], "name": call["function"]["name"],
                                    "arguments": ""})
            if arguments := call["function"].get("arguments"):
                self.items[-1]["arguments"] += arguments
                events.append(self.event("response.function_call_arguments.delta", **self.where(), delta=arguments))
        return events

    def text(self, delta: str) -> list[str]:
        """Events for more text of the message, opening one first if none is open."""
        events = []
        if not (self.open and self.items[-1]["type"] == "message"):
            events += self.close("completed")
            item_id = f"msg_{_suffix(self.request_id)}" + (f"_{len(self.items)}" if self.items else "")
            events += self.add({"id": item_id, "type": "message", "role": "assistant", "status": "in_progress",
                                "content": []})
            self.items[-1]["content"].append(text_part(""))
            events.append(self.event("response.content_part.added", **self.where(), part=text_part("")))
        if delta:
            self.items[-1]["content"][0]["text"] += delta
            events.append(self.event("response.output_text.delta", **self.where(), delta=delta, logprobs=[]))
        return events

    def add(self, item: dict[str, Any]) -> list[str]:
        self.items.append(item)
        self.open = True
        return [self.event("response.output_item.added", output_index=len(self.items) - 1, item=item)]

    def where(self) -> dict[str, Any]:
        """The open item's place, as its events name it."""
        where = {"output_index": len(self.items) - 1, "item_id": self.items[-1]["id"]}
        return {**where, "content_index": 0} if self.items[-1]["type"] == "message" else where

    def close(self, status: str) -> list[str]:
        """Events that end the open item, if one is: a message with `status`, a call (only ever given
        whole by the parser) completed."""
        if not self.open:
            return []
        self.open = False
        item = self.items[-1]
        item["status"] = status if item["type"] == "message" else "completed"
        if item["type"] == "message":
            part = item["content"][0]
            events = [self.event("response.output_text.done", **self.where(), text=part["text"], logprobs=[]),
                      self.event("response.content_part.done", **self.where(), part=part)]
        else:
            events = [self.event("response.function_call_arguments.done", **self.where(), name=item["name"],
                                 arguments=item["arguments"])]
        return [*events, self.event("response.output_item.done", output_index=len(self.items) - 1, item=item)]

    def finish(self, outputs: Sequence[RequestOutput]) -> list[str]:
        (output,) = outputs
        (completion,) = output.outputs
        status = "incomplete" if completion.finish_reason == "length" else "completed"
        events = [] if self.tool_calls is None else self.chat_deltas(self.tool_calls.finish())
        if not self.items:  # an empty output is still a message
            events += self.text("")
        events += self.close(status)
        self.response = response_body(self.call, self.request_id, self.model, self.items, status,
                                      response_usage(output))
        return [*events, self.event(f"response.{status}", response=self.response)]

    def error(self, error: dict[str, Any]) -> list[str]:
        detail = error["error"]
        return [self.event("error", code=detail.get("code"), message=detail.get("message"), param=detail.get("param"))]


def whole_response(call: ResponsesCall, output: RequestOutput, request_id: str, model: str) -> dict[str, Any]:
    """The non-streamed response: the one its stream would end with."""
    streamer = ResponsesStreamer(call, request_id, model)
    streamer.update(0, output)
    streamer.finish([output])
    assert streamer.response is not None
    return streamer.response
