"""A chat request's `tools`, `tool_choice` and `parallel_tool_calls`, checked alone, as OpenAI checks them.

`parse_tool_request(body)` returns None when the body has no tools, else a `ToolRequest`; anything
malformed raises RequestError naming the field ("tools", "tool_choice", "parallel_tool_calls").
As OpenAI: `tool_choice` without `tools` is an error, a named function must be one of the tools,
`tool_choice` defaults to "auto", `parallel_tool_calls` to true.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from tokenmill.errors import RequestError

FUNCTION_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")  # OpenAI's rule for a function's name
ToolChoice = Literal["none", "auto", "required", "function"]


@dataclass(frozen=True)
class FunctionTool:
    name: str
    parameters: dict[str, Any]  # the arguments' JSON schema, always of an object
    definition: dict[str, Any]  # the tool as the client gave it: what the chat template shows the model


@dataclass(frozen=True)
class ToolRequest:
    tools: tuple[FunctionTool, ...]
    choice: ToolChoice  # "function": the model must call `function`
    function: str | None
    parallel: bool  # False: at most one call per reply

    @property
    def callable_tools(self) -> tuple[FunctionTool, ...]:
        """The tools a reply may call: none for "none", the named one for "function", else all."""
        if self.choice == "none":
            return ()
        return tuple(t for t in self.tools if self.choice != "function" or t.name == self.function)

    @property
    def definitions(self) -> list[dict[str, Any]]:
        return [t.definition for t in self.tools]


def parse_tool_request(body: Mapping[str, Any]) -> ToolRequest | None:
    """The body's tools and how they may be called; None if it has no `tools`."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    parallel = body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise RequestError("invalid_type", f"body.parallel_tool_calls must be a boolean, got {json.dumps(parallel)}",
                           "parallel_tool_calls")
    if tools is None:
        if choice is not None:
            raise RequestError("invalid_value", "body.tool_choice is only allowed when body.tools are given",
                               "tool_choice")
        return None
    if not isinstance(tools, list) or not tools:
        raise RequestError("invalid_type", "body.tools must be a non-empty list of function tools", "tools")
    checked = tuple(_function_tool(tool, i) for i, tool in enumerate(tools))
    names = [t.name for t in checked]
    if len(set(names)) != len(names):
        duplicate = next(n for n in names if names.count(n) > 1)
        raise RequestError("invalid_value", f"body.tools has two functions named {duplicate!r}", "tools")
    kind, function = _tool_choice(choice, names)
    return ToolRequest(checked, kind, function, parallel is not False)


def _function_tool(tool: Any, index: int) -> FunctionTool:
    where = f"body.tools[{index}]"
    if not isinstance(tool, dict) or tool.get("type") != "function":
        raise RequestError("invalid_value", f"{where} must be a function tool: {{\"type\": \"function\", "
                                            "\"function\": {\"name\": ...}}", "tools")
    function = tool.get("function")
    if not isinstance(function, dict):
        raise RequestError("invalid_type", f"{where}.function must be an object", "tools")
    name = function.get("name")
    if not isinstance(name, str) or not FUNCTION_NAME.fullmatch(name):
        raise RequestError("invalid_value", f"{where}.function.name must be 1 to 64 letters, digits, underscores or "
                                            f"dashes, got {json.dumps(name)}", "tools")
    if not isinstance(function.get("description", ""), str):
        raise RequestError("invalid_type", f"{where}.function.description must be a string", "tools")
    if not isinstance(function.get("strict", False), bool):
        raise RequestError("invalid_type", f"{where}.function.strict must be a boolean", "tools")
    parameters = function.get("parameters", {})
    if not isinstance(parameters, dict) or parameters.get("type", "object") != "object":
        raise RequestError("invalid_value", f"{where}.function.parameters must be the JSON schema of an object",
                           "tools")
    # NOTE: a schema without a type (OpenAI accepts {} for "no parameters") still describes an
    # object: the arguments are one, and a grammar built from {} alone would allow any JSON value.
    return FunctionTool(name, {**parameters, "type": "object"}, tool)


def _tool_choice(choice: Any, names: list[str]) -> tuple[ToolChoice, str | None]:
    if choice is None:
        return "auto", None
    if choice in ("none", "auto", "required"):
        return choice, None
    function = choice.get("function") if isinstance(choice, dict) and choice.get("type") == "function" else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str):
        raise RequestError("invalid_value", "body.tool_choice must be \"none\", \"auto\", \"required\" or "
                                            "{\"type\": \"function\", \"function\": {\"name\": ...}}, got "
                                            f"{json.dumps(choice)}", "tool_choice")
    if name not in names:
        raise RequestError("invalid_value", f"body.tool_choice names function {name!r}, which is not in body.tools",
                           "tool_choice")
    return "function", name
