"""A reply's text read as content and tool calls, whole (`parse_reply`) or as it streams (`ToolCallStream`).

What a reply holds, in the model's format (formats.py):
- A call is a complete block that opens with one of the format's markers and reads as a call
  (`read_call`) of a function the request lets the reply call (`ToolRequest.callable_tools`). Its
  arguments come out as `json.dumps` writes them; its id is fresh ("call_" and 24 hex digits).
- Everything else is content, in order: a block that is malformed, or calls another function, stays
  content as written. A block still open when the text ends is a call if what it holds reads as
  one (Hermes: a missing `</tool_call>`), else content. Text between two calls that is only the
  format's separator (whitespace; Llama's ";") belongs to neither. Content that is only whitespace
  is None.
- `parallel_tool_calls` false: calls after the first are dropped (neither calls nor content), as
  vLLM does; "required" and named choices never produce them (their grammar allows one call).
- `tool_choice` "none": no calls; the content is the text as it is.
A reply with calls finishes with "tool_calls" (`AssistantReply.finish_reason`).

Streaming: `feed` each text delta, then `finish`; each returns OpenAI chat-chunk deltas, in order:
`{"content": text}`, a call's first `{"tool_calls": [{"index", "id", "type", "function": {"name",
"arguments": ""}}]}`, then its `{"tool_calls": [{"index", "function": {"arguments": text}}]}`. Their
concatenation is exactly `parse_reply` of the whole text (which is this parser fed once).
NOTE: a call goes out when its block is complete, its arguments in one piece: until then it may
still turn out malformed, and so be content. Text that may open a marker is held back, and so is
whitespace until some content that is not whitespace arrives.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from tokenmill.tools.formats import ToolCallFormat
from tokenmill.tools.request import ToolRequest


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # a JSON object's text

    def to_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(frozen=True)
class AssistantReply:
    content: str | None
    tool_calls: list[ToolCall]

    def message(self) -> dict[str, Any]:
        """The choice's `message`, as OpenAI writes it (no `tool_calls` key without calls)."""
        calls = {"tool_calls": [c.to_openai() for c in self.tool_calls]} if self.tool_calls else {}
        return {"role": "assistant", "content": self.content, **calls}

    def finish_reason(self, engine_reason: str | None) -> str | None:
        """"tool_calls" for a reply that stopped with calls; else the engine's reason ("length"...)."""
        return "tool_calls" if self.tool_calls and engine_reason == "stop" else engine_reason


class ToolCallStream:
    def __init__(self, fmt: ToolCallFormat, request: ToolRequest) -> None:
        self._format = fmt
        self._passthrough = request.choice == "none"
        self._names = {t.name for t in request.callable_tools}
        self._max_calls = None if request.parallel else 1
        self._buffer = ""  # text not yet given out; from a marker on while in a block
        self._in_block = False
        self._after_call = False  # nothing but a separator since the last call
        self._separator = ""  # that separator, held until what follows it is known
        self._content: list[str] = []
        self._spoke = False  # some content that is not whitespace has gone out
        self._leading_space = ""  # whitespace held until then
        self._calls: list[ToolCall] = []
        self._deltas: list[dict[str, Any]] = []

    def feed(self, text: str) -> list[dict[str, Any]]:
        """The deltas that `text`, the reply's next piece, lets out."""
        self._buffer += text
        self._advance(final=False)
        return self._take_deltas()

    def finish(self) -> list[dict[str, Any]]:
        """The deltas of what was held back, once the reply has ended."""
        self._advance(final=True)
        return self._take_deltas()

    def reply(self) -> AssistantReply:
        """The reply so far (complete after `finish`)."""
        content = "".join(self._content)
        return AssistantReply(content if self._passthrough or content.strip() else None, list(self._calls))

    def _advance(self, final: bool) -> None:
        markers = () if self._passthrough else self._format.markers
        while self._buffer:
            if self._in_block:
                end = self._format.call_end(self._buffer)
                if end is None and not final:
                    return
                end = len(self._buffer) if end is None else end
                block, self._buffer = self._buffer[:end], self._buffer[end:]
                self._in_block = False
                call = self._format.read_call(block)  # NOTE: also an unclosed block at the end, as vLLM reads one
                if call is not None and call[0] in self._names:
                    self._add_call(*call)
                else:
                    self._add_content(self._separator + block)
                self._separator = ""
                continue
            starts = [i for m in markers if (i := self._buffer.find(m)) >= 0]
            if starts:
                start = min(starts)
                self._in_block = True
            else:
                start = len(self._buffer) - (0 if final else _held_prefix(self._buffer, markers))
            text, self._buffer = self._buffer[:start], self._buffer[start:]
            separator = self._separator + text
            if self._after_call and self._format.between_calls.fullmatch(separator) and (self._in_block or not final):
                self._separator = separator  # dropped if a call follows
            else:
                self._add_content(separator)
                self._separator = ""
            if not self._in_block:
                return
        if final:
            self._add_content(self._separator)
            self._separator = ""

    def _add_call(self, name: str, arguments: dict[str, Any]) -> None:
        self._after_call = True
        if self._max_calls is not None and len(self._calls) >= self._max_calls:
            return
        call = ToolCall(f"call_{uuid.uuid4().hex[:24]}", name, json.dumps(arguments, ensure_ascii=False))
        index = len(self._calls)
        self._calls.append(call)
        self._deltas.append({"tool_calls": [{"index": index, "id": call.id, "type": "function",
                                             "function": {"name": name, "arguments": ""}}]})
        self._deltas.append({"tool_calls": [{"index": index, "function": {"arguments": call.arguments}}]})

    def _add_content(self, text: str) -> None:
        if not text:
            return
        self._after_call = False
        self._content.append(text)
        if not (self._passthrough or self._spoke):
            self._leading_space += text
            if not self._leading_space.strip():
                return
            text, self._leading_space, self._spoke = self._leading_space, "", True
        if self._deltas and "content" in self._deltas[-1]:
            self._deltas[-1]["content"] += text
        else:
            self._deltas.append({"content": text})

    def _take_deltas(self) -> list[dict[str, Any]]:
        deltas, self._deltas = self._deltas, []
        return deltas


def _held_prefix(text: str, markers: tuple[str, ...]) -> int:
    """The length of the longest end of `text` that may be the start of a marker."""
    return max((k for m in markers for k in range(1, min(len(m), len(text) + 1)) if text.endswith(m[:k])),
               default=0)


def parse_reply(fmt: ToolCallFormat, request: ToolRequest, text: str) -> AssistantReply:
    """A finished reply's content and calls."""
    stream = ToolCallStream(fmt, request)
    stream.feed(text)
    stream.finish()
    return stream.reply()
