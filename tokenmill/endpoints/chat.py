"""`/v1/chat/completions`: a conversation through the model's chat template, one prompt, n choices.

Tools (tokenmill/tools/) reach the prompt in the model's own tool-call format; "required" and a
named tool_choice constrain the reply to calls; each choice's text is parsed into content and
`tool_calls`, and streamed as OpenAI streams them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tokenmill.endpoints.base import Call, Endpoint, Streamer, check_fields, typed, usage
from tokenmill.endpoints.sampling import SAMPLING_FIELDS, SHAPED_FIELDS, sampling_params, with_defaults
from tokenmill.endpoints.text_stream import TextStreamer
from tokenmill.errors import RequestError
from tokenmill.outputs import CompletionOutput, EngineOutput, Logprob, RequestOutput, TokenLogprobs
from tokenmill.tools import (
    ToolCallFormat,
    ToolCallStream,
    ToolRequest,
    parse_reply,
    parse_tool_request,
    prepare_chat,
    tool_call_format,
    tool_constraint,
)

if TYPE_CHECKING:
    from tokenmill.frontend import Frontend

CHAT_URL = "/v1/chat/completions"
USED_FIELDS = frozenset({
    "messages", "max_tokens", "max_completion_tokens", "logprobs", "top_logprobs", "response_format", "stream",
    "stream_options", "chat_template_kwargs", "add_generation_prompt", "tools", "tool_choice", "parallel_tool_calls",
    *SAMPLING_FIELDS, *SHAPED_FIELDS})
REFUSED_FIELDS = {
    "audio": "is not supported: this server generates text only",
    "modalities": "is not supported: this server generates text only",
    "prediction": "is not supported (predicted outputs)",
    "web_search_options": "is not supported: this server has no web search",
    "functions": "is not supported: give tools instead (functions is deprecated)",
    "function_call": "is not supported: give tool_choice instead (function_call is deprecated)",
    "reasoning_effort": "is not supported: the model does not reason",
}


@dataclass
class ChatCall(Call):
    messages: list[dict[str, Any]] | None = None
    top_logprobs: int = 0
    template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool = True
    tools: ToolRequest | None = None
    tool_format: ToolCallFormat | None = None  # the model's, set by prepare


def prepare_conversation(frontend: Frontend, call: ChatCall) -> None:
    """What chat and the Responses API share: the conversation and its tools through the model's
    template, the model's generation defaults, the reply's constraint (tools/grammar.py) compiled."""
    assert call.messages is not None
    call.tool_format = tool_call_format(frontend.tokenizer)
    # NOTE: on every request, tools or not: a follow-up turn holds tool calls and results.
    messages, template_kwargs = prepare_chat(call.tool_format, call.messages, call.tools, call.template_kwargs)
    call.prompts = [frontend.tokenize_chat(messages, call.add_generation_prompt, template_kwargs)]
    params = with_defaults(call.params, call.body, frontend.generation_defaults)
    if call.tools is not None:
        constraint = tool_constraint(call.tool_format, call.tools, params.structured_outputs,
                                     whole_reply="structured_outputs" in call.body)
        params = dataclasses.replace(params, structured_outputs=constraint)
    call.params = params
    if params.structured_outputs is not None:
        try:
            frontend.compile(params.structured_outputs)
        except RequestError as e:
            raise RequestError(e.code, e.message, "tools" if call.tools is not None else e.param) from None


def check_messages(messages: Any) -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not messages:
        raise RequestError("invalid_type", "body.messages must be a non-empty list of messages", "messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise RequestError("invalid_type", f"body.messages[{i}] must be an object with a role", "messages")
        content = m.get("content")
        if content is None and m["role"] == "assistant" and m.get("tool_calls"):
            continue  # a turn of tool calls only, as OpenAI sends it back
        if not (isinstance(content, str) or (isinstance(content, list) and all(
                isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content))):
            raise RequestError("invalid_type", f"body.messages[{i}].content must be a string or a list of text "
                                               "parts", "messages")
    return messages


def _token(logprob: Logprob) -> dict[str, Any]:
    text = logprob.decoded_token or ""
    return {"token": text, "logprob": logprob.logprob, "bytes": list(text.encode())}


def chat_logprobs(completion: CompletionOutput, top: int, start: int = 0) -> dict[str, Any] | None:
    """A choice's logprobs object (chat's shape), for its tokens from `start` on."""
    if completion.logprobs is None:
        return None
    content = []
    entries: list[TokenLogprobs] = completion.logprobs[start:]
    for token_id, entry in zip(completion.token_ids[start:], entries):
        ranked = sorted((lp for lp in entry.values() if lp.rank <= top), key=lambda lp: lp.rank)
        content.append({**_token(entry[token_id]), "top_logprobs": [_token(lp) for lp in ranked]})
    return {"content": content, "refusal": None}


class ChatStreamer(TextStreamer):
    object_name = "chat.completion.chunk"

    def __init__(self, call: Call, request_id: str, model: str) -> None:
        super().__init__(call, request_id, model)
        assert isinstance(call, ChatCall)
        self.chat = call
        self.tool_streams = None if call.tools is None or call.tool_format is None else \
            [ToolCallStream(call.tool_format, call.tools) for _ in range(self.n)]

    def start(self) -> list[str]:
        return [self.chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None,
                             "logprobs": None}]) for i in range(self.n)]

    def choice_deltas(self, index: int, completion: CompletionOutput, text: str,
                      start_token: int) -> list[dict[str, Any]]:
        logprobs = chat_logprobs(completion, self.chat.top_logprobs, start_token)
        if self.tool_streams is None:
            return [{"delta": {"content": text}, "finish_reason": completion.finish_reason, "logprobs": logprobs}]
        stream = self.tool_streams[index]
        deltas = stream.feed(text) + (stream.finish() if completion.finished() else [])
        finish_reason = stream.reply().finish_reason(completion.finish_reason) if completion.finished() else None
        if finish_reason is not None or (not deltas and logprobs is not None):
            deltas.append({})  # the finish in a chunk of its own, as OpenAI's; logprobs of held-back text
        if not deltas:  # a tool call's text, held back until it parses
            return []
        entries = [{"delta": delta, "finish_reason": None, "logprobs": None} for delta in deltas]
        entries[0]["logprobs"], entries[-1]["finish_reason"] = logprobs, finish_reason
        return entries


class ChatCompletions(Endpoint):
    url = CHAT_URL
    task = "generate"
    id_prefix = "chatcmpl"
    prompt_field = "messages"

    def parse(self, body: Any) -> ChatCall:
        if not isinstance(body, dict):
            raise RequestError("invalid_body", "body must be a JSON object")
        check_fields(body, self.url, USED_FIELDS, REFUSED_FIELDS)
        messages = check_messages(body.get("messages"))
        max_tokens = typed(body, "max_completion_tokens", (int,)) or typed(body, "max_tokens", (int,))
        logprobs = typed(body, "top_logprobs", (int,)) or 0 if typed(body, "logprobs", (bool,)) else None
        template_kwargs = typed(body, "chat_template_kwargs", (dict,))
        add_generation_prompt = typed(body, "add_generation_prompt", (bool,))
        params = sampling_params(body, max_tokens, logprobs=logprobs)
        tools = parse_tool_request(body)
        return ChatCall(body, params, messages=messages, top_logprobs=logprobs or 0, template_kwargs=template_kwargs,
                        add_generation_prompt=add_generation_prompt is not False, tools=tools)

    def prepare(self, frontend: Frontend, call: Call) -> None:
        assert isinstance(call, ChatCall)
        prepare_conversation(frontend, call)

    def respond(self, call: Call, outputs: Sequence[EngineOutput], request_id: str, model: str) -> dict[str, Any]:
        assert isinstance(call, ChatCall)
        (output,) = outputs
        assert isinstance(output, RequestOutput)
        choices = []
        for c in output.outputs:
            message: dict[str, Any] = {"role": "assistant", "content": c.text}
            finish_reason = c.finish_reason
            if call.tools is not None and call.tool_format is not None:
                reply = parse_reply(call.tool_format, call.tools, c.text)
                message, finish_reason = reply.message(), reply.finish_reason(c.finish_reason)
            choices.append({"index": c.index, "finish_reason": finish_reason,
                            "logprobs": chat_logprobs(c, call.top_logprobs), "message": message})
        return {"id": request_id, "object": "chat.completion", "created": call.created, "model": model,
                "choices": choices, "usage": usage([output])}

    def streamer(self, call: Call, request_id: str, model: str) -> Streamer:
        return ChatStreamer(call, request_id, model)
