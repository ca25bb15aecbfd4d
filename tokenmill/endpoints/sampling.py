"""The sampling fields of the generating endpoints (chat, completions, responses), read one way.

OpenAI's names and vLLM's extensions map onto `SamplingParams`; each endpoint adds its own names
for the token limit, logprobs and output format. A field the body leaves out takes the model's
generation default (its generation_config, as vLLM does), else SamplingParams'.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from tokenmill.endpoints.base import typed
from tokenmill.errors import RequestError
from tokenmill.sampling_params import SamplingParams, StructuredOutputsParams

NUMBER, INTEGER, BOOLEAN, LIST, OBJECT = (int, float), (int,), (bool,), (list,), (dict,)
# Body field -> its type, named as the SamplingParams field it sets.
SAMPLING_FIELDS: dict[str, tuple[type, ...]] = {
    "n": INTEGER, "temperature": NUMBER, "top_p": NUMBER, "top_k": INTEGER, "min_p": NUMBER,
    "presence_penalty": NUMBER, "frequency_penalty": NUMBER, "repetition_penalty": NUMBER, "seed": INTEGER,
    "ignore_eos": BOOLEAN, "min_tokens": INTEGER, "stop_token_ids": LIST, "include_stop_str_in_output": BOOLEAN,
    "skip_special_tokens": BOOLEAN, "allowed_token_ids": LIST, "bad_words": LIST, "speculative": BOOLEAN,
}
# Fields SamplingParams takes from a body under another name or shape.
SHAPED_FIELDS = frozenset({"stop", "logit_bias", "structured_outputs"})


def sampling_params(body: dict[str, Any], max_tokens: int | None, **extra: Any) -> SamplingParams:
    """SamplingParams from the body's sampling fields, the endpoint's token limit and anything
    else the endpoint read (`extra`: logprobs, structured_outputs, ...). Raises RequestError."""
    kwargs: dict[str, Any] = {name: value for name, kinds in SAMPLING_FIELDS.items()
                              if (value := typed(body, name, kinds)) is not None}
    stop = body.get("stop")
    if stop is not None:
        if not (isinstance(stop, str) or (isinstance(stop, list) and all(isinstance(s, str) for s in stop))):
            raise RequestError("invalid_type", "body.stop must be a string or a list of strings", "stop")
        kwargs["stop"] = stop
    if (bias := typed(body, "logit_bias", OBJECT)) is not None:
        kwargs["logit_bias"] = _logit_bias(bias)
    kwargs.setdefault("structured_outputs", structured_outputs(body))
    kwargs.update(extra)
    try:
        return SamplingParams(max_tokens=max_tokens, **kwargs)
    except ValueError as e:  # the message starts with the field's name
        raise RequestError("invalid_value", f"body.{e}", str(e).split()[0]) from None


def _logit_bias(bias: dict[str, Any]) -> dict[int, float]:
    """OpenAI's logit_bias: token ids (as JSON keys, strings) -> a bias in [-100, 100]."""
    result = {}
    for key, value in bias.items():
        if not key.lstrip("-").isdigit() or isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RequestError("invalid_value", f"body.logit_bias must map token ids to numbers, got "
                                                f"{key!r}: {value!r}", "logit_bias")
        result[int(key)] = float(value)
    return result


def with_defaults(params: SamplingParams, body: dict[str, Any], defaults: dict[str, Any]) -> SamplingParams:
    """params with the model's generation defaults for the sampling fields the body left out."""
    missing = {name: value for name, value in defaults.items() if body.get(name) is None}
    return dataclasses.replace(params, **missing) if missing else params


def structured_outputs(body: dict[str, Any], format_field: str = "response_format") -> StructuredOutputsParams | None:
    """OpenAI's response_format (the Responses API's text.format), or vLLM's structured_outputs
    (json, regex, choice, grammar)."""
    response_format, structured = body.get(format_field), body.get("structured_outputs")
    if response_format is not None and structured is not None:
        raise RequestError("invalid_value", f"give {format_field} or structured_outputs, not both", format_field)
    try:
        if structured is not None:
            if not isinstance(structured, dict):
                raise ValueError("structured_outputs must be an object")
            return StructuredOutputsParams(**structured)
        return None if response_format is None else output_format(response_format, format_field)
    except (TypeError, ValueError) as e:
        param = "structured_outputs" if structured is not None else format_field
        raise RequestError("invalid_value", f"body.{param}: {e}", param) from None


def output_format(value: Any, name: str) -> StructuredOutputsParams | None:
    """{"type": "text" | "json_object" | "json_schema", ...}: chat's json_schema nests its schema in
    "json_schema", the Responses API's text.format has it at the top."""
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutputsParams(json_object=True)
    if kind == "json_schema":
        spec = value.get("json_schema", value)
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise ValueError(f"{name} json_schema must be an object with a schema object")
        return StructuredOutputsParams(json=spec["schema"])
    raise ValueError(f"{name}.type must be text, json_object or json_schema")
