"""The constraint that makes `tool_choice` "required" or a named function hold: `tool_constraint`.

The grammar allows only the model's own call syntax (format.call_affixes), with the allowed names
and each function's arguments following its JSON schema (`strict` or not: an argument that does not
validate is never useful), compact as `json.dumps` writes it. "required" with `parallel_tool_calls`
true: one or more calls, joined as the format joins them; false, or a named function: exactly one
(as OpenAI and vLLM force a named function once). Nothing else, before or after: the reply is its
calls, and always parses into them (parser.py) unless max_tokens cuts it.

NOTE: xgrammar builds it (its structural tags, each schema through its JSON-schema converter) and
prints it as EBNF, so it travels as `StructuredOutputsParams(grammar=...)` like any grammar and
the engine's compiler (engine/structured.py) caches it by its text.
"""

from __future__ import annotations

import re

import xgrammar as xgr
from xgrammar.structural_tag import (
    ConstStringFormat,
    GrammarFormat,
    OrFormat,
    SequenceFormat,
    StarFormat,
    StructuralTag,
    TagFormat,
)

from tokenmill.errors import RequestError
from tokenmill.sampling_params import StructuredOutputsParams
from tokenmill.tools.formats import ToolCallFormat
from tokenmill.tools.request import ToolRequest


def tool_constraint(fmt: ToolCallFormat, request: ToolRequest) -> StructuredOutputsParams | None:
    """The grammar for "required" and a named function; None for "auto" and "none". A parameters
    schema that the grammar library cannot follow raises RequestError (param "tools")."""
    if request.choice not in ("required", "function"):
        return None
    calls = []
    for index, tool in enumerate(request.tools):
        if tool not in request.callable_tools:
            continue
        try:
            arguments = xgr.Grammar.from_json_schema(tool.parameters, any_whitespace=False)
        except (RuntimeError, ValueError, TypeError) as e:
            raise RequestError("invalid_value", f"body.tools[{index}].function.parameters: {_reason(e)}",
                               "tools") from None
        before, after = fmt.call_affixes(tool.name)
        calls.append(TagFormat(begin=before, content=GrammarFormat(grammar=str(arguments)), end=after))
    call = OrFormat(elements=calls)
    several = request.parallel and request.choice == "required"
    more = StarFormat(content=SequenceFormat(elements=[ConstStringFormat(value=fmt.joiner), call]))
    grammar = xgr.Grammar.from_structural_tag(
        StructuralTag(format=SequenceFormat(elements=[call, more]) if several else call))
    return StructuredOutputsParams(grammar=str(grammar))


def _reason(e: Exception) -> str:
    """The library's message without its time stamp and source location."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return re.sub(r"^\[[^\]]*\]\s*\S+:\d+:\s*", "", text)
