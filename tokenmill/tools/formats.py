"""A model's tool-call format: how its replies write a call, and how its prompts show tools.

Chosen once per model by `tool_call_format(tokenizer)`, from its chat template's source:
- `HermesFormat`: `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` blocks, as the
  Qwen2.5, Qwen3, SmolLM3 and Hermes templates write them; also the default, for a template that
  says nothing about tools (SmolLM2's).
- `Llama3JsonFormat`: `{"name": ..., "parameters": {...}}`, optionally after `<|python_tag|>`, as the
  Llama 3.1 and 3.2 templates describe it.

A format also records whether the template renders tools itself (its source uses `tools`): then
the tools and tool messages go to the template as they are; else `prepare_chat` (render.py) writes
them into the conversation in this format's words.
"""

from __future__ import annotations

import functools
import json
import re
from abc import ABC, abstractmethod
from typing import Any, ClassVar

from transformers import PreTrainedTokenizerBase


class ToolCallFormat(ABC):
    markers: ClassVar[tuple[str, ...]]  # texts that open a call in a reply
    joiner: ClassVar[str]  # what the format writes between two calls
    between_calls: ClassVar[re.Pattern[str]]  # text between two calls that belongs to neither
    argument_keys: ClassVar[tuple[str, ...]]  # the key of a call's arguments, in the order tried

    def __init__(self, template_renders_tools: bool) -> None:
        self.template_renders_tools = template_renders_tools

    def __repr__(self) -> str:
        return f"{type(self).__name__}(template_renders_tools={self.template_renders_tools})"

    @abstractmethod
    def call_affixes(self, name: str) -> tuple[str, str]:
        """The text before and after a call's arguments object, as this format writes a call."""

    def call_text(self, name: str, arguments: dict[str, Any]) -> str:
        before, after = self.call_affixes(name)
        return before + json.dumps(arguments, ensure_ascii=False) + after

    @abstractmethod
    def call_end(self, text: str) -> int | None:
        """Where the call block that `text` opens (it starts with a marker) ends; None if that
        cannot be known before more text arrives."""

    @abstractmethod
    def call_json(self, block: str) -> str:
        """A complete block's JSON text: the block without the format's markers."""

    def read_call(self, block: str) -> tuple[str, dict[str, Any]] | None:
        """A complete block's function name and arguments; None if it is not a well-formed call."""
        try:
            call = json.loads(self.call_json(block))
        except json.JSONDecodeError:
            return None
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            return None
        arguments = next((call[k] for k in self.argument_keys if k in call), None)
        return (call["name"], arguments) if isinstance(arguments, dict) else None

    @abstractmethod
    def tools_prompt(self, definitions: list[dict[str, Any]]) -> str:
        """The system prompt's part that shows the tools, for a template that does not."""

    @abstractmethod
    def tool_results_message(self, results: list[str]) -> dict[str, Any]:
        """One message for consecutive tool results, for a template that does not render them."""


class HermesFormat(ToolCallFormat):
    markers = ("<tool_call>",)
    joiner = "\n"
    between_calls = re.compile(r"\s*")
    argument_keys = ("arguments",)
    END = "</tool_call>"

    def call_affixes(self, name: str) -> tuple[str, str]:
        return f'<tool_call>\n{{"name": "{name}", "arguments": ', "}\n" + self.END

    def call_end(self, text: str) -> int | None:
        end = text.find(self.END)
        end = None if end < 0 else end + len(self.END)
        # NOTE: a block that another opens before it closes ends there (malformed, so content), so
        # that a model's second try at a call still reads as one.
        reopened = text.find(self.markers[0], len(self.markers[0]))
        return reopened if reopened >= 0 and (end is None or reopened < end) else end

    def call_json(self, block: str) -> str:
        return block.removeprefix(self.markers[0]).removesuffix(self.END)

    def tools_prompt(self, definitions: list[dict[str, Any]]) -> str:
        # Qwen2.5's words, which the Hermes-style templates share.
        listed = "".join("\n" + json.dumps(d, ensure_ascii=False) for d in definitions)
        return ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                f"You are provided with function signatures within <tools></tools> XML tags:\n<tools>{listed}\n"
                "</tools>\n\nFor each function call, return a json object with function name and arguments within "
                "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
                "<args-json-object>}\n</tool_call>")

    def tool_results_message(self, results: list[str]) -> dict[str, Any]:
        return {"role": "user", "content": "\n".join(f"<tool_response>\n{r}\n</tool_response>" for r in results)}


class Llama3JsonFormat(ToolCallFormat):
    PYTHON_TAG = "<|python_tag|>"
    markers = (PYTHON_TAG, '{"name"')
    joiner = "; "
    between_calls = re.compile(r"\s*;?\s*")
    argument_keys = ("parameters", "arguments")

    def call_affixes(self, name: str) -> tuple[str, str]:
        return f'{{"name": "{name}", "parameters": ', "}"

    def call_end(self, text: str) -> int | None:
        start = 0
        if text.startswith(self.PYTHON_TAG):
            rest = text[len(self.PYTHON_TAG):]
            start = len(text) - len(rest.lstrip())
            if start == len(text):
                return None
            if text[start] != "{":
                return len(self.PYTHON_TAG)  # a tag without a call: not a call
        return _json_object_end(text, start)

    def call_json(self, block: str) -> str:
        return block.removeprefix(self.PYTHON_TAG)

    def tools_prompt(self, definitions: list[dict[str, Any]]) -> str:
        # Llama 3.1's words for custom tools.
        listed = "".join(json.dumps(d, ensure_ascii=False, indent=4) + "\n\n" for d in definitions)
        return ("Given the following functions, please respond with a JSON for a function call with its proper "
                "arguments that best answers the given prompt.\n\nRespond in the format {\"name\": function name, "
                "\"parameters\": dictionary of argument name and its value}. Do not use variables.\n\n" + listed)

    def tool_results_message(self, results: list[str]) -> dict[str, Any]:
        return {"role": "ipython", "content": "\n".join(results)}


def _json_object_end(text: str, start: int) -> int | None:
    """The end of the JSON value that opens at text[start] (brackets counted outside strings); None
    if it is not closed yet. Whether it parses is read_call's question."""
    depth, in_string, escaped = 0, False, False
    for i in range(start, len(text)):
        c = text[i]
        if escaped:
            escaped = False
        elif in_string:
            escaped, in_string = c == "\\", c != '"'
        elif c == '"':
            in_string = True
        elif c in "{[":
            depth += 1
        elif c in "}]":
            depth -= 1
            if depth == 0:
                return i + 1
    return None


@functools.cache  # once per model: the tokenizer object is its key
def tool_call_format(tokenizer: PreTrainedTokenizerBase) -> ToolCallFormat:
    """The model's format, read from its chat template (its tool-use template, where it has several)."""
    try:
        template = tokenizer.get_chat_template(tools=[])
    except ValueError:  # no chat template: chats fail anyway, and plain prompts never call tools
        template = ""
    renders_tools = re.search(r"\btools\b", template) is not None
    if "<tool_call>" in template:
        return HermesFormat(renders_tools)
    if Llama3JsonFormat.PYTHON_TAG in template or '"parameters": ' in template:
        return Llama3JsonFormat(renders_tools)
    return HermesFormat(renders_tools)
