"""`/v1/responses`: OpenAI's Responses API, as a chat conversation through the model's chat template.

The request becomes the conversation chat completions would render:
- `instructions`: a system message first;
- `input`: a string (one user message) or a list of input items: messages (role user, system,
  developer or assistant; content a string or text parts: `input_text`, or `output_text` of an
  earlier response given back), `function_call` items (an assistant turn's `tool_calls`, those in a
  row and a text message just before them joined into one turn) and `function_call_output` items
  (`tool` messages). A developer message is a system message: chat templates know no other.
`max_output_tokens`, the sampling fields (vLLM's extensions too, as chat takes them), `text.format`
(text, json_object, json_schema with its schema at the top of the format) or vLLM's
`structured_outputs`, and function `tools` in the Responses' flat shape with `tool_choice` and
`parallel_tool_calls` shape the one output. The tools go through tokenmill/tools/ as chat's do:
shown in the prompt in the model's format, "required" and a named function held by a grammar, the
calls read back from the text; a text format binds a text reply only (tools/grammar.py). Nothing is stored, so
`previous_response_id` and `conversation` are refused like every other field that would change
the output and is not supported here (endpoints/base.py `check_fields`).

The response and its stream: responses_output.py.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tokenmill.endpoints.base import Call, Endpoint, Streamer, check_fields, typed
from tokenmill.endpoints.chat import ChatCall, prepare_conversation
from tokenmill.endpoints.responses_output import ResponsesStreamer, whole_response
from tokenmill.endpoints.sampling import (
    SAMPLING_FIELDS,
    SHAPED_FIELDS,
    output_format,
    sampling_params,
    structured_outputs,
)
from tokenmill.errors import RequestError
from tokenmill.outputs import EngineOutput, RequestOutput
from tokenmill.sampling_params import StructuredOutputsParams
from tokenmill.tools import (
    ToolRequest,
    parse_tool_request,
)

if TYPE_CHECKING:
    from tokenmill.frontend import Frontend

RESPONSES_URL = "/v1/responses"
USED_FIELDS = frozenset({
    "input", "instructions", "max_output_tokens", "text", "stream", "truncation", "tools", "tool_choice",
    "parallel_tool_calls",
    # Bookkeeping that changes nothing here (OpenAI's prompt cache and abuse tracking, its built-in
    # tools' call limit: there are none), echoed in the response.
    "prompt_cache_key", "safety_identifier", "max_tool_calls",
    # NOTE: a response has one output: chat's `n` has no place here.
    *(SAMPLING_FIELDS.keys() - {"n"}), *SHAPED_FIELDS})
STORED = "is not supported: this server stores no responses; send the whole conversation as input"
REFUSED_FIELDS = {
    "previous_response_id": STORED, "conversation": STORED,
    "prompt": "is not supported: this server stores no prompt templates",
    "background": "is not supported: a response runs while its request waits (use /v1/batches for jobs)",
    "reasoning": "is not supported: the model does not reason",
    "include": "is not supported: this server has no extra outputs to include",
    "top_logprobs": "is not supported by /v1/responses here (use /v1/chat/completions for logprobs)",
}
# Input roles -> the chat template's.
ROLES = {"user": "user", "system": "system", "developer": "system", "assistant": "assistant"}
TEXT_PARTS = ("input_text", "output_text")


@dataclass
class ResponsesCall(ChatCall):
    """A chat call (its conversation, tools and format) that answers as a Responses object."""


def _string(item: dict[str, Any], name: str, where: str) -> str:
    value = item.get(name)
    if not isinstance(value, str):
        raise RequestError("invalid_type", f"{where}.{name} must be a string", "input")
    return value


def _text(content: Any, where: str) -> str:
    """A content (a string, or a list of text parts) as text; parts joined by newlines, as vLLM joins
    them for templates that take text."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise RequestError("invalid_type", f"{where} must be a string or a list of input_text parts", "input")
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in TEXT_PARTS:
            raise RequestError("invalid_value", f"{where}[{j}].type {json.dumps(kind)} is not supported: this "
                                                "server reads text parts (input_text, output_text) only", "input")
        texts.append(_string(part, "text", f"{where}[{j}]"))
    return "\n".join(texts)


def _call(item: dict[str, Any], where: str) -> dict[str, Any]:
    """A function_call item as a chat tool call; its arguments must be a JSON object's text."""
    arguments = _string(item, "arguments", where)
    try:
        parsed = json.loads(arguments)
    except json.JSONDecodeError:
        parsed = None
    if not isinstance(parsed, dict):
        raise RequestError("invalid_value", f"{where}.arguments must be the text of a JSON object", "input")
    return {"id": _string(item, "call_id", where), "type": "function",
            "function": {"name": _string(item, "name", where), "arguments": arguments}}


def conversation(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The chat messages of `instructions` and `input`; raises RequestError naming the field."""
    instructions = typed(body, "instructions", (str,))
    messages: list[dict[str, Any]] = [{"role": "system", "content": instructions}] if instructions else []
    items = body.get("input")
    if isinstance(items, str):
        return [*messages, {"role": "user", "content": items}]
    if not isinstance(items, list) or not items:
        raise RequestError("invalid_type", "body.input must be a string or a non-empty list of input items", "input")
    for i, item in enumerate(items):
        where = f"body.input[{i}]"
        kind = item.get("type", "message") if isinstance(item, dict) else None
        if kind == "message":
            role = item.get("role")
            if role not in ROLES:
                raise RequestError("invalid_value", f"{where}.role must be user, system, developer or assistant, got "
                                                    f"{json.dumps(role)}", "input")
            messages.append({"role": ROLES[role], "content": _text(item.get("content"), f"{where}.content")})
        elif kind == "function_call":
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":  # the same turn's text or other calls
                last.setdefault("tool_calls", []).append(_call(item, where))
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [_call(item, where)]})
        elif kind == "function_call_output":
            messages.append({"role": "tool", "tool_call_id": _string(item, "call_id", where),
                             "content": _text(item.get("output"), f"{where}.output")})
        else:
            raise RequestError("invalid_value", f"{where} must be a message, function_call or function_call_output "
                                                f"item, got type {json.dumps(kind)}", "input")
    return messages


def text_format(body: dict[str, Any]) -> StructuredOutputsParams | None:
    """The constraint of `text.format` (or of vLLM's `structured_outputs`); None for plain text."""
    text = typed(body, "text", (dict,))
    for key in text or {}:
        if key != "format":
            raise RequestError("unsupported_parameter", f"body.text.{key} is not supported", "text")
    if text is None or text.get("format") is None:
        return structured_outputs(body)
    if body.get("structured_outputs") is not None:
        raise RequestError("invalid_value", "give text.format or structured_outputs, not both", "text")
    try:
        return output_format(text["format"], "text.format")
    except (TypeError, ValueError) as e:
        raise RequestError("invalid_value", f"body.{e}", "text") from None


def _chat_tool(tool: Any, index: int) -> dict[str, Any]:
    """A Responses function tool ({"type": "function", "name", ...}) in chat's nested shape."""
    kind = tool.get("type") if isinstance(tool, dict) else None
    if kind != "function":
        raise RequestError("unsupported_parameter", f"body.tools[{index}] of type {json.dumps(kind)} is not supported: "
                                                    "this server has function tools only", "tools")
    return {"type": "function", "function": {key: tool[key] for key in ("name", "description", "parameters", "strict")
                                             if tool.get(key) is not None}}


def tool_request(body: dict[str, Any]) -> ToolRequest | None:
    """The body's function tools and tool_choice, read as chat's (tokenmill/tools/); None without tools."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    if tools == [] and choice in (None, "none", "auto"):  # as an earlier response echoes them: no tools
        tools = choice = None
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("name"), str):
        choice = {"type": "function", "function": {"name": choice["name"]}}
    elif choice not in (None, "none", "auto", "required"):
        raise RequestError("invalid_value", 'body.tool_choice must be "none", "auto", "required" or {"type": '
                                            f'"function", "name": ...}}, got {json.dumps(choice)}', "tool_choice")
    chat = {"tools": [_chat_tool(t, i) for i, t in enumerate(tools)] if isinstance(tools, list) else tools,
            "tool_choice": choice, "parallel_tool_calls": body.get("parallel_tool_calls")}
    try:
        return parse_tool_request(chat)
    except RequestError as e:
        raise _flat(e) from None


def _flat(error: RequestError) -> RequestError:
    """A tools error as the Responses shape names the field (tokenmill/tools/ names chat's nesting)."""
    return RequestError(error.code, error.message.replace("].function.", "]."), error.param)


class Responses(Endpoint):
    url = RESPONSES_URL
    task = "generate"
    id_prefix = "resp"
    prompt_field = "input"

    def parse(self, body: Any) -> ResponsesCall:
        if not isinstance(body, dict):
            raise RequestError("invalid_body", "body must be a JSON object")
        check_fields(body, self.url, USED_FIELDS, REFUSED_FIELDS)
        if body.get("truncation") not in (None, "disabled"):
            raise RequestError("unsupported_parameter", f"body.truncation {json.dumps(body['truncation'])} is not "
                                                        "supported: an input past the context is refused, never cut",
                               "truncation")
        typed(body, "stream", (bool,))
        max_tokens = typed(body, "max_output_tokens", (int,))
        if max_tokens is not None and max_tokens < 1:
            raise RequestError("invalid_value", f"body.max_output_tokens must be at least 1, got {max_tokens}",
                               "max_output_tokens")
        messages = conversation(body)
        tools = tool_request(body)
        params = sampling_params(body, max_tokens, structured_outputs=text_format(body))
        return ResponsesCall(body, params, messages=messages, tools=tools)

    def prepare(self, frontend: Frontend, call: Call) -> None:
        assert isinstance(call, ResponsesCall)
        try:
            prepare_conversation(frontend, call)
        except RequestError as e:
            raise _flat(e) from None

    def blamed_param(self, param: str | None) -> str | None:
        # The engine's and the chat template's names for what the client sent as input and text.format.
        return {"prompt": "input", "messages": "input", "response_format": "text"}.get(param or "", param)

    def respond(self, call: Call, outputs: Sequence[EngineOutput], request_id: str, model: str) -> dict[str, Any]:
        assert isinstance(call, ResponsesCall)
        (output,) = outputs
        assert isinstance(output, RequestOutput)
        return whole_response(call, output, request_id, model)

    def streamer(self, call: Call, request_id: str, model: str) -> Streamer:
        assert isinstance(call, ResponsesCall)
        return ResponsesStreamer(call, request_id, model)

