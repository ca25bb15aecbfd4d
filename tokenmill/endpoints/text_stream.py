"""Streams chat and completions choices as OpenAI does: `data:` chunks of text deltas, each choice's
finish_reason once, an optional usage chunk, then `data: [DONE]`.

A call with k prompts of n samples each streams k * n choices, prompt i's sample j as choice
i * n + j (as vLLM numbers them). Text that could be the start of a stop string is held back
until it is not.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from typing import Any

from tokenmill.endpoints.base import Call, Streamer, sse, usage
from tokenmill.outputs import CompletionOutput, RequestOutput

DONE = "data: [DONE]\n\n"


class TextStreamer(Streamer):
    object_name: str  # of each chunk

    def __init__(self, call: Call, request_id: str, model: str) -> None:
        params = call.params
        self.call, self.request_id, self.model = call, request_id, model
        self.n = params.n
        self.hold = max((len(s) for s in params.stop_strings), default=1) - 1  # type: ignore[union-attr]
        choices = len(call.prompts) * self.n
        self.sent_chars, self.sent_tokens = [0] * choices, [0] * choices
        self.reported_finish = [False] * choices  # finish_reason goes out once per choice
        options = call.body.get("stream_options")
        self.include_usage = isinstance(options, dict) and options.get("include_usage") is True

    def chunk(self, choices: list[dict[str, Any]], **extra: Any) -> str:
        return sse({"id": self.request_id, "object": self.object_name, "created": self.call.created,
                    "model": self.model, "choices": choices, **extra})

    @abstractmethod
    def choice_deltas(self, index: int, completion: CompletionOutput, text: str,
                      start_token: int) -> list[dict[str, Any]]:
        """The choice's chunk entries (one chunk each) for its new text and its tokens from
        start_token on."""

    def update(self, index: int, output: RequestOutput) -> list[str]:
        events = []
        for c in output.outputs:
            i = index * self.n + c.index
            if self.reported_finish[i]:
                continue
            self.reported_finish[i] = c.finished()
            end = len(c.text) if c.finished() else max(self.sent_chars[i], len(c.text) - self.hold)
            delta = c.text[self.sent_chars[i]:end]
            if not delta and not c.finished():
                continue
            events += [self.chunk([{"index": i, **entry}]) for entry in self.choice_deltas(i, c, delta,
                                                                                           self.sent_tokens[i])]
            self.sent_chars[i], self.sent_tokens[i] = end, len(c.token_ids)
        return events

    def error(self, error: dict[str, Any]) -> list[str]:
        return [sse(error), DONE]

    def finish(self, outputs: Sequence[RequestOutput]) -> list[str]:
        return ([self.chunk([], usage=usage(outputs))] if self.include_usage else []) + [DONE]
