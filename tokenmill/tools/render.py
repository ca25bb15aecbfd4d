"""A conversation and its tools made ready for the model's chat template: `prepare_chat`.

Call it on every chat request, tools or not (a follow-up turn holds assistant `tool_calls` with
`content: null` and `role: "tool"` messages even where a request gives no tools), then hand what it
returns to the template (`Frontend.tokenize_chat(messages, add_generation_prompt, kwargs)`):
- A template that renders tools itself gets `tools=` (as transformers passes it) and the messages
  as OpenAI sends them, except that a call's `arguments` (OpenAI's JSON text) become the object the
  templates expect (they write it with `tojson`).
- Any other template (SmolLM2's: it concatenates `message['content']`, and never reads `tools`)
  gets a conversation rewritten in the model's format: the tools listed in the system message
  (merged with the request's own), assistant calls as their call text, tool results as the format's
  tool-result turn (Hermes: `<tool_response>` blocks in a user turn, as Qwen2.5's template writes).
Either way the tools reach the prompt, also for `tool_choice: "none"` (as OpenAI shows them), and
every content is text: a null content becomes "", a list of text parts their texts joined by "\n"
(as vLLM joins them for templates that take text).
"""

from __future__ import annotations

import json
from typing import Any

from tokenmill.errors import RequestError
from tokenmill.tools.formats import ToolCallFormat
from tokenmill.tools.request import ToolRequest


def prepare_chat(fmt: ToolCallFormat, messages: list[dict[str, Any]], tools: ToolRequest | None,
                 chat_template_kwargs: dict[str, Any] | None = None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The messages and template keyword arguments to render; the given ones are not modified. A
    malformed assistant tool call raises RequestError (param "messages")."""
    kwargs = dict(chat_template_kwargs or {})
    if fmt.template_renders_tools:
        if tools is not None:
            kwargs["tools"] = tools.definitions
        return [_for_template(m, i) for i, m in enumerate(messages)], kwargs
    return _rewritten(fmt, messages, tools), kwargs


def _for_template(message: dict[str, Any], index: int) -> dict[str, Any]:
    out = {**message, "content": _text(message.get("content"))}
    if message.get("tool_calls") is not None:
        out["tool_calls"] = [{**call, "function": {"name": name, "arguments": arguments}}
                             for call, (name, arguments) in zip(message["tool_calls"], _calls(message, index))]
    return out


def _rewritten(fmt: ToolCallFormat, messages: list[dict[str, Any]], tools: ToolRequest | None) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    results: list[str] = []  # consecutive tool results, written as one turn
    for i, message in enumerate(messages):
        if message.get("role") == "tool":
            results.append(_text(message.get("content")))
            continue
        if results:
            out.append(fmt.tool_results_message(results))
            results = []
        message = {**message, "content": _text(message.get("content"))}
        if message.get("tool_calls") is not None:
            calls = fmt.joiner.join(fmt.call_text(name, arguments) for name, arguments in _calls(message, i))
            message["content"] = "\n".join(part for part in (message["content"], calls) if part)
            del message["tool_calls"]
        out.append(message)
    if results:
        out.append(fmt.tool_results_message(results))
    if tools is None:
        return out
    listing = fmt.tools_prompt(tools.definitions)
    if out and out[0].get("role") == "system":
        return [{**out[0], "content": f"{out[0]['content']}\n\n{listing}"}, *out[1:]]
    return [{"role": "system", "content": listing}, *out]


def _calls(message: dict[str, Any], index: int) -> list[tuple[str, dict[str, Any]]]:
    """An assistant message's tool calls: each one's name and arguments object."""
    where = f"body.messages[{index}].tool_calls"
    calls = message["tool_calls"]
    if message.get("role") != "assistant" or not isinstance(calls, list):
        raise RequestError("invalid_value", f"{where} must be a list, in an assistant message", "messages")
    read = []
    for j, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        name = function.get("name") if isinstance(function, dict) else None
        arguments = function.get("arguments") if isinstance(function, dict) else None
        try:  # OpenAI sends the arguments as JSON text; LLM.chat users may give the object itself
            arguments = json.loads(arguments) if isinstance(arguments, str) else arguments
        except json.JSONDecodeError:
            arguments = None
        if not isinstance(name, str) or not isinstance(arguments, dict):
            raise RequestError("invalid_value", f"{where}[{j}] must be {{\"type\": \"function\", \"function\": "
                                                "{\"name\": ..., \"arguments\": <a JSON object's text>}}",
                               "messages")
        read.append((name, arguments))
    return read


def _text(content: Any) -> str:
    """A message's content as text: a string, its text parts joined, or "" for none."""
    if content is None:
        return ""
    if isinstance(content, list):
        return "\n".join(part.get("text", "") for part in content if isinstance(part, dict))
    return str(content)
