"""The constraint of a reply with tools: `tool_constraint`, from `tool_choice` and the request's
output format (response_format, text.format, structured_outputs), which binds only a text reply:
- "required" or a named function: the reply is calls (the format has nothing to bind);
- "auto" with a format: calls, or text in the format (the two grammars' union);
- "auto" without one: free; "none": the format alone.
vLLM's `structured_outputs` instead binds the whole reply, as in vLLM: with "auto" or "none" it
stands as given (a reply it makes a call block is still read as a call); with "required" or a named
function the two cannot both hold, and the request is refused.

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

from tokenmill.engine.structured import grammar_of
from tokenmill.errors import RequestError
from tokenmill.sampling_params import StructuredOutputsParams
from tokenmill.tools.formats import ToolCallFormat
from tokenmill.tools.request import ToolRequest


def tool_constraint(fmt: ToolCallFormat, request: ToolRequest, output: StructuredOutputsParams | None = None,
                    whole_reply: bool = False) -> StructuredOutputsParams | None:
    """The reply's constraint (see above) given the request's output format (`whole_reply`: vLLM's
    structured_outputs); None for a free reply. A parameters schema that the grammar library
    cannot follow raises RequestError (param "tools")."""
    if whole_reply and output is not None and request.choice in ("required", "function"):
        raise RequestError("invalid_value", "structured_outputs binds the whole reply: it cannot be combined with "
                                            "a required or named tool_choice", "tool_choice")
    if request.choice == "none" or (request.choice == "auto" and (output is None or whole_reply)):
        return output
    if request.choice == "auto":
        several = request.parallel
        try:
            text = grammar_of(output)  # type: ignore[arg-type]
        except ValueError as e:
            raise RequestError("invalid_value", str(e), "response_format") from None
        return StructuredOutputsParams(grammar=str(xgr.Grammar.union(_calls(fmt, request, several), text)))
    several = request.parallel and request.choice == "required"
    return StructuredOutputsParams(grammar=str(_calls(fmt, request, several)))


def _calls(fmt: ToolCallFormat, request: ToolRequest, several: bool) -> xgr.Grammar:
    """One call of a callable tool in the model's syntax, or with `several` one or more."""
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
    more = StarFormat(content=SequenceFormat(elements=[ConstStringFormat(value=fmt.joiner), call]))
    return xgr.Grammar.from_structural_tag(StructuralTag(format=SequenceFormat(elements=[call, more]) if several
                                                         else call))


def _reason(e: Exception) -> str:
    """The library's message without its time stamp and source location."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return re.sub(r"^\[[^\]]*\]\s*\S+:\d+:\s*", "", text)
