"""Tool calling and structured output through the libraries people put on top of an OpenAI endpoint (the
official `openai` client, langchain-openai, instructor), against a real `tokenmill serve` running the default
model (SmolLM2-135M-Instruct, whose template knows no tools: they reach it rewritten as Hermes `<tool_call>`
instructions in the system prompt).

Every case fails on a server that ignores the field under test: a 135M model asked a question answers in
prose, so a call, a parseable JSON object or a validated Pydantic object only comes back when the server
constrains the reply ("required", a named function, response_format) or parses the model's own call format
("auto": the reply is forced into a Hermes block by `structured_outputs`, and must come back as tool_calls).
All greedy (temperature 0), so streamed and non-streamed replies are the same text.
"""

from __future__ import annotations

import functools
import json
import operator
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import httpx
import instructor
import jsonschema
import openai
import pydantic
import pytest
from langchain_core.utils.function_calling import convert_to_openai_tool
from langchain_openai import ChatOpenAI
from test_batch import read_jsonl, run_cli, write_jsonl
from test_server import API_KEY, Server

from tokenmill.models.loader import default_model_path

WEATHER_SCHEMA = {"type": "object", "properties": {"city": {"type": "string"},
                                                   "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                  "required": ["city", "unit"]}
ADD_SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
              "required": ["a", "b"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                           "parameters": WEATHER_SCHEMA}},
         {"type": "function", "function": {"name": "add", "description": "Add two integers",
                                           "parameters": ADD_SCHEMA}}]
SCHEMAS = {"get_weather": WEATHER_SCHEMA, "add": ADD_SCHEMA}
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]
# What "auto" must parse: the model's reply forced into a Hermes call block, as a tool-calling model writes it.
HERMES_CALL = (r'<tool_call>\n\{"name": "get_weather", "arguments": \{"city": "[A-Z][a-z]{1,12}", '
               r'"unit": "(celsius|fahrenheit)"\}\}\n</tool_call>')
FORCED_HERMES = {"structured_outputs": {"regex": HERMES_CALL}}
WEATHER_REPORT = json.dumps({"temperature": 22, "unit": "celsius", "sky": "sunny"})


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    running = Server(default_model_path(), tmp_path_factory.mktemp("clients_server")).start()
    yield running
    running.kill()


class Recorder:
    """The JSON bodies a library sends, read off its HTTP client: what each mode asks of the server."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.http = httpx.Client(event_hooks={"request": [self.record]}, timeout=120)

    def record(self, request: httpx.Request) -> None:
        if request.method == "POST":
            self.bodies.append(json.loads(request.content))


def checked_calls(calls: list[Any] | None) -> list[tuple[str, dict[str, Any]]]:
    """The calls' names and arguments, each with an id and arguments valid against its function's schema."""
    assert calls, "no tool_calls came back"
    ids = [c.id for c in calls]
    assert all(i and i.startswith("call_") for i in ids) and len(set(ids)) == len(ids)
    out = []
    for call in calls:
        assert call.type == "function"
        arguments = json.loads(call.function.arguments)
        jsonschema.validate(arguments, SCHEMAS[call.function.name])
        out.append((call.function.name, arguments))
    return out


def streamed_calls(client: openai.OpenAI, **request: Any) -> tuple[list[dict[str, Any]], str | None, str]:
    """A streamed reply reassembled from its chunks as OpenAI's docs do it: each call's id, name and the
    concatenation of its `arguments` pieces, by index; the finish reason; the content."""
    calls: dict[int, dict[str, Any]] = {}
    finish_reason, content = None, ""
    for chunk in client.chat.completions.create(stream=True, **request):
        for choice in chunk.choices:
            content += choice.delta.content or ""
            finish_reason = choice.finish_reason or finish_reason
            for delta in choice.delta.tool_calls or []:
                call = calls.setdefault(delta.index, {"id": None, "name": "", "arguments": ""})
                call["id"] = call["id"] or delta.id
                call["name"] += (delta.function and delta.function.name) or ""
                call["arguments"] += (delta.function and delta.function.arguments) or ""
    return [calls[i] for i in sorted(calls)], finish_reason, content


def test_tools_reach_the_prompt_and_none_leaves_a_call_as_content(client: openai.OpenAI, model: str) -> None:
    plain = client.chat.completions.create(model=model, messages=QUESTION, max_tokens=1, temperature=0)
    none = client.chat.completions.create(model=model, messages=QUESTION, tools=TOOLS, tool_choice="none",
                                          max_tokens=60, temperature=0, extra_body=FORCED_HERMES)
    assert none.usage.prompt_tokens > plain.usage.prompt_tokens + 100  # the tools' definitions, in the prompt
    (choice,) = none.choices
    # "none": the very call block that "auto" parses (below) stays text.
    assert choice.finish_reason == "stop" and not choice.message.tool_calls
    assert choice.message.content.startswith('<tool_call>\n{"name": "get_weather"')


@pytest.mark.parametrize("tool_choice", ["required", "named", "auto"])
def test_tool_call_streamed_and_not(client: openai.OpenAI, model: str, tool_choice: str) -> None:
    request: dict[str, Any] = {"model": model, "messages": QUESTION, "tools": TOOLS, "max_tokens": 60,
                               "temperature": 0}
    expected_name = "get_weather"
    if tool_choice == "required":
        request |= {"tool_choice": "required", "parallel_tool_calls": False}
    elif tool_choice == "named":  # not the function the question asks for: the name must be honoured
        request["tool_choice"], expected_name = {"type": "function", "function": {"name": "add"}}, "add"
    else:  # "auto" sees the model's own call format in its reply and parses it
        request |= {"tool_choice": "auto", "extra_body": FORCED_HERMES}
    reply = client.chat.completions.create(**request)
    (choice,) = reply.choices
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    ((name, _),) = checked_calls(choice.message.tool_calls)
    assert name == expected_name
    calls, finish_reason, content = streamed_calls(client, **request)
    assert finish_reason == "tool_calls" and content == ""
    assert all(c["id"].startswith("call_") for c in calls)
    assert [(c["name"], c["arguments"]) for c in calls] == \
        [(c.function.name, c.function.arguments) for c in choice.message.tool_calls]


def test_parallel_tool_calls_false_gives_one_call(client: openai.OpenAI, model: str) -> None:
    request: dict[str, Any] = {"model": model, "messages": QUESTION, "tools": TOOLS, "tool_choice": "required",
                               "max_tokens": 120, "temperature": 0}
    several = client.chat.completions.create(**request)
    # This model, free to, calls get_weather twice (both units): the case that the flag must cut to one.
    assert several.choices[0].finish_reason == "tool_calls"
    calls = checked_calls(several.choices[0].message.tool_calls)
    assert len(calls) > 1
    one = client.chat.completions.create(parallel_tool_calls=False, **request)
    assert one.choices[0].finish_reason == "tool_calls"
    assert checked_calls(one.choices[0].message.tool_calls) == calls[:1]


def test_round_trip_with_the_tool_result(client: openai.OpenAI, model: str) -> None:
    """The stream helper's reassembled call, sent back as the assistant turn with the tool's result."""
    with client.chat.completions.stream(model=model, messages=QUESTION, tools=TOOLS, tool_choice="required",
                                        parallel_tool_calls=False, max_tokens=60, temperature=0) as stream:
        called = stream.get_final_completion().choices[0]
    assert called.finish_reason == "tool_calls"
    ((name, arguments),) = checked_calls(called.message.tool_calls)
    assert name == "get_weather" and arguments["city"] == "Paris"
    (call,) = called.message.tool_calls
    turn = [*QUESTION,
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": call.id, "type": "function",
                 "function": {"name": call.function.name, "arguments": call.function.arguments}}]},
            {"role": "tool", "tool_call_id": call.id, "content": WEATHER_REPORT}]
    answer = client.chat.completions.create(model=model, messages=turn, tools=TOOLS, max_tokens=40, temperature=0)
    (choice,) = answer.choices
    assert choice.finish_reason in ("stop", "length") and not choice.message.tool_calls
    assert "22" in choice.message.content  # the tool's result reached the model
    # And so did the call: the same turn without it is a shorter prompt.
    callless = [*QUESTION, {"role": "assistant", "content": ""}, turn[-1]]
    shorter = client.chat.completions.create(model=model, messages=callless, tools=TOOLS, max_tokens=1)
    assert answer.usage.prompt_tokens > shorter.usage.prompt_tokens + 20


class Weather(pydantic.BaseModel):
    """Current weather in a city"""

    city: str
    unit: Literal["celsius", "fahrenheit"]


def test_parse_with_a_pydantic_tool(client: openai.OpenAI, model: str) -> None:
    """The client's own structured tools: a strict function from a Pydantic model, arguments parsed back."""
    tool = openai.pydantic_function_tool(Weather)
    parsed = client.chat.completions.parse(model=model, messages=QUESTION, tools=[tool], tool_choice="required",
                                           parallel_tool_calls=False, max_tokens=60, temperature=0)
    (choice,) = parsed.choices
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.function.parsed_arguments == Weather(city="Paris", unit="celsius")


def get_weather(city: str, unit: Literal["celsius", "fahrenheit"]) -> str:
    """Current weather in a city."""
    return WEATHER_REPORT


def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


@pytest.fixture(scope="module")
def chat_model(server: Server, model: str) -> ChatOpenAI:
    return ChatOpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, model=model, temperature=0, max_tokens=60,
                      max_retries=0, timeout=120)


@pytest.mark.parametrize(("tool_choice", "expected_name"), [("any", "get_weather"), ("add", "add")])
def test_langchain_bind_tools(chat_model: ChatOpenAI, tool_choice: str, expected_name: str) -> None:
    bound = chat_model.bind_tools([get_weather, add], tool_choice=tool_choice, parallel_tool_calls=False)
    message = bound.invoke(QUESTION[0]["content"])
    assert message.response_metadata["finish_reason"] == "tool_calls"
    (call,) = message.tool_calls
    assert call["name"] == expected_name and call["id"].startswith("call_")
    function = get_weather if expected_name == "get_weather" else add
    jsonschema.validate(call["args"], convert_to_openai_tool(function)["function"]["parameters"])
    streamed = functools.reduce(operator.add, bound.stream(QUESTION[0]["content"]))
    assert streamed.response_metadata["finish_reason"] == "tool_calls"
    assert [(c["name"], c["args"]) for c in streamed.tool_calls] == [(call["name"], call["args"])]


@pytest.mark.parametrize("method", ["function_calling", "json_schema"])
def test_langchain_structured_output(chat_model: ChatOpenAI, method: str) -> None:
    weather = chat_model.with_structured_output(Weather, method=method).invoke(QUESTION[0]["content"])
    assert isinstance(weather, Weather) and weather.city == "Paris"


class City(pydantic.BaseModel):
    city: str


CITY_QUESTION = [{"role": "user", "content": "Which city is the capital of France? Answer in JSON."}]
# What each instructor mode asks of the server (instructor/v2/providers/openai/handlers.py): TOOLS a call of
# the model's one function, forced by name; JSON response_format json_object, the schema only in a system
# prompt; JSON_SCHEMA response_format json_schema.
MODE_FIELDS = {instructor.Mode.TOOLS: ("tools", "tool_choice"), instructor.Mode.JSON: ("response_format",),
               instructor.Mode.JSON_SCHEMA: ("response_format",)}


@pytest.mark.parametrize("mode", list(MODE_FIELDS))
def test_instructor_modes(server: Server, model: str, mode: instructor.Mode) -> None:
    recorder = Recorder()
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0,
                       http_client=recorder.http) as raw:
        structured = instructor.from_openai(raw, mode=mode)
        city = structured.chat.completions.create(model=model, response_model=City, messages=CITY_QUESTION,
                                                  max_tokens=60, temperature=0, max_retries=0)
        assert isinstance(city, City) and city.city == "Paris"
        (sent,) = recorder.bodies
        if mode == instructor.Mode.TOOLS:
            assert sent["tool_choice"] == {"type": "function", "function": {"name": "City"}}
            assert [t["function"]["name"] for t in sent["tools"]] == ["City"]
        elif mode == instructor.Mode.JSON:
            assert sent["response_format"] == {"type": "json_object"}
        else:
            assert sent["response_format"]["type"] == "json_schema"
            assert set(sent["response_format"]["json_schema"]["schema"]["properties"]) == {"city"}
        # The same request with the mode's fields dropped, as a server that ignored them would run it: prose.
        unconstrained = {k: v for k, v in sent.items() if k not in MODE_FIELDS[mode]}
        text = raw.chat.completions.create(**unconstrained).choices[0].message.content
        with pytest.raises(pydantic.ValidationError):
            City.model_validate_json(text)


def test_auto_with_a_response_format_calls_or_answers_in_the_format(client: openai.OpenAI, model: str) -> None:
    """response_format binds a text reply only: with tools on "auto" the reply is calls or JSON in the
    format (a server that ignored either would let prose through, or refuse the pair)."""
    schema = {"type": "object", "properties": {"colour": {"type": "string", "maxLength": 12}},
              "required": ["colour"], "additionalProperties": False}
    response_format: Any = {"type": "json_schema", "json_schema": {"name": "colour", "schema": schema}}
    for question in ("What is the weather in Paris?", "Reply with your favourite colour.", "Hello!"):
        reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                               tools=TOOLS, tool_choice="auto", parallel_tool_calls=False,
                                               response_format=response_format, max_tokens=60, temperature=0)
        (choice,) = reply.choices
        if choice.message.tool_calls:
            checked_calls(choice.message.tool_calls)
        else:
            jsonschema.validate(json.loads(choice.message.content or ""), schema)


def test_batch_lines_call_tools_as_the_server_does(tmp_path: Path, client: openai.OpenAI, model: str) -> None:
    """`tokenmill run` reads a chat line's tools through the same endpoint as the server: its record
    holds the same tool_calls (ids aside) and finish_reason."""
    body = {"messages": QUESTION, "tools": TOOLS, "tool_choice": "required", "parallel_tool_calls": False,
            "max_tokens": 60, "temperature": 0}
    path = write_jsonl(tmp_path / "in.jsonl", [{"custom_id": "tools", "method": "POST",
                                                "url": "/v1/chat/completions", "body": body}])
    run_cli(path, "-o", tmp_path / "out.jsonl", "--dtype", "float32")  # as the server runs
    (record,) = read_jsonl(tmp_path / "out.jsonl")
    (choice,) = record["response"]["body"]["choices"]
    served = client.chat.completions.create(model=model, **body).choices[0]  # type: ignore[arg-type]
    assert choice["finish_reason"] == served.finish_reason == "tool_calls"
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in choice["message"]["tool_calls"]] == \
        [(c.function.name, c.function.arguments) for c in served.message.tool_calls or []]
