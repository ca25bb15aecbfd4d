"""The OpenAI Batch file format: one input line in, one output or error record out.

Each line is validated alone; whatever is wrong with it becomes a `LineError` naming the line and
the field, and the job goes on. Chat and completions bodies are checked here, embeddings bodies in
embeddings.py.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tokenmill.batch.embeddings import EMBEDDINGS_URL, EmbeddingRequest, parse_embedding_body
from tokenmill.errors import RequestError
from tokenmill.outputs import CompletionOutput, Logprob, RequestOutput, TokenLogprobs
from tokenmill.sampling_params import SamplingParams, StructuredOutputsParams

if TYPE_CHECKING:
    from tokenmill.frontend import Frontend

CHAT_URL = "/v1/chat/completions"
COMPLETIONS_URL = "/v1/completions"
URLS = (CHAT_URL, COMPLETIONS_URL, EMBEDDINGS_URL)


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
    # A chat or completions body's sampling settings; an embeddings body's inputs and pooling settings.
    params: SamplingParams | EmbeddingRequest


def _typed(body: dict[str, Any], name: str, kinds: tuple[type, ...]) -> Any:
    """body[name], None if absent; a LineError if it is not of one of kinds (a bool is no number)."""
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        names = {(int,): "an integer", (int, float): "a number", (bool,): "a boolean"}[kinds]
        raise LineError("invalid_type", f"body.{name} must be {names}, got {json.dumps(value)}", param=name)
    return value


def sampling_params_from_body(body: dict[str, Any], url: str) -> SamplingParams:
    number, integer, boolean = (int, float), (int,), (bool,)
    kwargs: dict[str, Any] = {}
    max_tokens = _typed(body, "max_tokens", integer)
    if url == CHAT_URL:
        max_tokens = _typed(body, "max_completion_tokens", integer) or max_tokens
        if _typed(body, "logprobs", boolean):
            kwargs["logprobs"] = _typed(body, "top_logprobs", integer) or 0
    elif (logprobs := _typed(body, "logprobs", integer)) is not None:
        kwargs["logprobs"] = logprobs
    kwargs["max_tokens"] = max_tokens
    for name, kinds in (("n", integer), ("temperature", number), ("top_p", number), ("top_k", integer),
                        ("min_p", number), ("presence_penalty", number), ("frequency_penalty", number),
                        ("repetition_penalty", number), ("seed", integer), ("ignore_eos", boolean),
                        ("min_tokens", integer)):
        value = _typed(body, name, kinds)
        if value is not None:
            kwargs[name] = value
    stop = body.get("stop")
    if stop is not None:
        if not (isinstance(stop, str) or (isinstance(stop, list) and all(isinstance(s, str) for s in stop))):
            raise LineError("invalid_type", "body.stop must be a string or a list of strings", param="stop")
        kwargs["stop"] = stop
    kwargs["structured_outputs"] = _structured_outputs(body)
    try:
        return SamplingParams(**kwargs)
    except ValueError as e:
        raise LineError("invalid_value", f"body.{e}", param=str(e).split()[0]) from None


def _structured_outputs(body: dict[str, Any]) -> StructuredOutputsParams | None:
    """OpenAI's response_format, or vLLM's structured_outputs (json, regex, choice, grammar)."""
    response_format, structured = body.get("response_format"), body.get("structured_outputs")
    if response_format is not None and structured is not None:
        raise LineError("invalid_value", "give response_format or structured_outputs, not both",
                        param="response_format")
    try:
        if structured is not None:
            if not isinstance(structured, dict):
                raise ValueError("structured_outputs must be an object")
            return StructuredOutputsParams(**structured)
        if response_format is None:
            return None
        kind = response_format.get("type") if isinstance(response_format, dict) else None
        if kind == "text":
            return None
        if kind == "json_object":
            return StructuredOutputsParams(json_object=True)
        if kind == "json_schema":
            spec = response_format.get("json_schema")
            if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
                raise ValueError("response_format.json_schema must be an object with a schema object")
            return StructuredOutputsParams(json=spec["schema"])
        raise ValueError("response_format.type must be text, json_object or json_schema")
    except (TypeError, ValueError) as e:
        param = "structured_outputs" if structured is not None else "response_format"
        raise LineError("invalid_value", f"body.{param}: {e}", param=param) from None


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise LineError("invalid_type", "body.messages must be a non-empty list of messages", param="messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise LineError("invalid_type", f"body.messages[{i}] must be an object with a role", param="messages")
        content = m.get("content")
        if not (isinstance(content, str) or (isinstance(content, list) and all(
                isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content))):
            raise LineError("invalid_type", f"body.messages[{i}].content must be a string or a list of text parts",
                            param="messages")


def validate_body(url: str, body: Any) -> SamplingParams:
    """Checks a chat or completions request body; returns its sampling settings or raises LineError."""
    if not isinstance(body, dict):
        raise LineError("invalid_body", "body must be a JSON object")
    if url == CHAT_URL:
        _check_messages(body.get("messages"))
    else:
        prompt = body.get("prompt")
        if not isinstance(prompt, str) and not (isinstance(prompt, list) and prompt
                                                and all(isinstance(t, int) for t in prompt)):
            raise LineError("invalid_type", "body.prompt must be a string or a list of token ids", param="prompt")
    return sampling_params_from_body(body, url)


def prepare_request(frontend: Frontend, url: str, body: dict[str, Any],
                    params: SamplingParams) -> tuple[str | None, list[int]]:
    """What a validated body needs before it goes to the engine, done outside its step loop: the
    prompt's text (if any) and token ids, and its grammar compiled (the engine then finds it in
    xgrammar's cache). Raises RequestError."""
    prompt = body["messages"] if url == CHAT_URL else body["prompt"]
    text, token_ids = frontend.tokenize_chat(prompt) if url == CHAT_URL else frontend.tokenize(prompt)
    if params.structured_outputs is not None:
        frontend.compile(params.structured_outputs)
    return text, token_ids


def _line_params(url: str, body: Any) -> SamplingParams | EmbeddingRequest:
    if url != EMBEDDINGS_URL:
        return validate_body(url, body)
    try:
        return parse_embedding_body(body)
    except RequestError as e:
        raise LineError(e.code, e.message, param=e.param) from None


def blamed_param(url: str, param: str | None) -> str | None:
    """The request field an error names: a chat request's prompt is its messages, an embeddings
    request's its input."""
    if param != "prompt":
        return param
    return {CHAT_URL: "messages", EMBEDDINGS_URL: "input"}.get(url, param)


def request_id_prefix(url: str) -> str:
    """As OpenAI names its ids: chatcmpl-... for chat completions, cmpl-... for completions (and
    embd-... for embeddings, which OpenAI leaves unnamed)."""
    return {CHAT_URL: "chatcmpl", EMBEDDINGS_URL: "embd"}.get(url, "cmpl")


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
        if url not in URLS:
            raise LineError("invalid_url", f"url must be {CHAT_URL}, {COMPLETIONS_URL} or {EMBEDDINGS_URL}, "
                                           f"got {url!r}")
        body = record.get("body")
        return BatchLine(line_no, custom_id, url, body, _line_params(url, body))
    except LineError as e:
        e.message = f"line {line_no}: {e.message}"
        e.custom_id = custom_id
        raise


def _chat_token(logprob: Logprob) -> dict[str, Any]:
    text = logprob.decoded_token or ""
    return {"token": text, "logprob": logprob.logprob, "bytes": list(text.encode())}


def _chat_logprobs(entries: list[TokenLogprobs], token_ids: list[int], top: int) -> dict[str, Any]:
    content = []
    for token_id, entry in zip(token_ids, entries):
        ranked = sorted((lp for lp in entry.values() if lp.rank <= top), key=lambda lp: lp.rank)
        content.append({**_chat_token(entry[token_id]), "top_logprobs": [_chat_token(lp) for lp in ranked]})
    return {"content": content, "refusal": None}


def _completion_logprobs(entries: list[TokenLogprobs], token_ids: list[int], top: int) -> dict[str, Any]:
    tokens, token_logprobs, top_logprobs, offsets, offset = [], [], [], [], 0
    for token_id, entry in zip(token_ids, entries):
        text = entry[token_id].decoded_token or ""
        tokens.append(text)
        token_logprobs.append(entry[token_id].logprob)
        top_logprobs.append({entry[t].decoded_token or "": entry[t].logprob for t in entry if entry[t].rank <= top})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs, "text_offset": offsets}


def choice_logprobs(url: str, completion: CompletionOutput, top: int, start: int = 0) -> dict[str, Any] | None:
    """The OpenAI logprobs object of a choice, for its tokens from `start` on."""
    if completion.logprobs is None:
        return None
    entries, token_ids = completion.logprobs[start:], completion.token_ids[start:]
    return (_chat_logprobs if url == CHAT_URL else _completion_logprobs)(entries, token_ids, top)


def usage(output: RequestOutput) -> dict[str, Any]:
    completion_tokens = sum(len(c.token_ids) for c in output.outputs)
    prompt_tokens = len(output.prompt_token_ids)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": output.num_cached_tokens}}


def response_body(url: str, params: SamplingParams, output: RequestOutput, model: str) -> dict[str, Any]:
    """A complete chat.completion or text_completion object, with usage."""
    completions: list[CompletionOutput] = output.outputs
    top = params.logprobs or 0
    choices: list[dict[str, Any]] = []
    for c in completions:
        choice: dict[str, Any] = {"index": c.index, "finish_reason": c.finish_reason,
                                  "logprobs": choice_logprobs(url, c, top)}
        if url == CHAT_URL:
            choice["message"] = {"role": "assistant", "content": c.text}
        else:
            choice["text"] = c.text
        choices.append(choice)
    return {
        "id": output.request_id,
        "object": "chat.completion" if url == CHAT_URL else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": usage(output),
    }


def output_record(record_id: str, line: BatchLine, request_id: str, body: dict[str, Any]) -> dict[str, Any]:
    """A line's record, with its response body (`response_body`, or embeddings.py's)."""
    return {"id": record_id, "custom_id": line.custom_id,
            "response": {"status_code": 200, "request_id": request_id, "body": body},
            "error": None}


def error_record(record_id: str, error: LineError) -> dict[str, Any]:
    return {"id": record_id, "custom_id": error.custom_id,
            "response": {"status_code": 400, "request_id": None,
                         "body": {"error": {"message": error.message, "type": "invalid_request_error",
                                            "param": error.param, "code": error.code}}},
            "error": {"code": error.code, "message": error.message}}
