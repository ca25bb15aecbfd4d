"""`/v1/chat/completions`: a conversation through the model's chat template, one prompt, n choices."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tokenmill.endpoints.base import Call, Endpoint, Streamer, check_fields, typed, usage
from tokenmill.endpoints.sampling import SAMPLING_FIELDS, SHAPED_FIELDS, sampling_params, with_defaults
from tokenmill.endpoints.text_stream import TextStreamer
from tokenmill.errors import RequestError
from tokenmill.outputs import CompletionOutput, EngineOutput, Logprob, RequestOutput, TokenLogprobs

if TYPE_CHECKING:
    from tokenmill.frontend import Frontend

CHAT_URL = "/v1/chat/completions"
USED_FIELDS = frozenset({
    "messages", "max_tokens", "max_completion_tokens", "logprobs", "top_logprobs", "response_format", "stream",
    "stream_options", "chat_template_kwargs", "add_generation_prompt", *SAMPLING_FIELDS, *SHAPED_FIELDS})
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


def check_messages(messages: Any) -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not messages:
        raise RequestError("invalid_type", "body.messages must be a non-empty list of messages", "messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise RequestError("invalid_type", f"body.messages[{i}] must be an object with a role", "messages")
        content = m.get("content")
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

    def start(self) -> list[str]:
        return [self.chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None,
                             "logprobs": None} for i in range(self.n)])]

    def choice_delta(self, index: int, completion: CompletionOutput, text: str, start_token: int) -> dict[str, Any]:
        assert isinstance(self.call, ChatCall)
        return {"delta": {"content": text}, "finish_reason": completion.finish_reason,
                "logprobs": chat_logprobs(completion, self.call.top_logprobs, start_token)}


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
        return ChatCall(body, params, messages=messages, top_logprobs=logprobs or 0, template_kwargs=template_kwargs,
                        add_generation_prompt=add_generation_prompt is not False)

    def prepare(self, frontend: Frontend, call: Call) -> None:
        assert isinstance(call, ChatCall) and call.messages is not None
        call.prompts = [frontend.tokenize_chat(call.messages, call.add_generation_prompt, call.template_kwargs)]
        call.params = with_defaults(call.params, call.body, frontend.generation_defaults)
        if call.params.structured_outputs is not None:
            frontend.compile(call.params.structured_outputs)

    def respond(self, call: Call, outputs: Sequence[EngineOutput], request_id: str, model: str) -> dict[str, Any]:
        assert isinstance(call, ChatCall)
        (output,) = outputs
        assert isinstance(output, RequestOutput)
        choices = [{"index": c.index, "finish_reason": c.finish_reason,
                    "logprobs": chat_logprobs(c, call.top_logprobs),
                    "message": {"role": "assistant", "content": c.text}} for c in output.outputs]
        return {"id": request_id, "object": "chat.completion", "created": call.created, "model": model,
                "choices": choices, "usage": usage([output])}

    def streamer(self, call: Call, request_id: str, model: str) -> Streamer:
        return ChatStreamer(call, request_id, model)
