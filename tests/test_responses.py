"""`/v1/responses` through the official `openai` client against a real `tokenmill serve` running the
default model (SmolLM2-135M-Instruct), in batch files through `tokenmill run` and `/v1/batches`.

Greedy outputs are compared token for token with chat completions on the same conversation, so a
server that dropped `instructions`, an input item or `text.format` fails."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import jsonschema
import openai
import pydantic
import pytest
from test_batch import read_jsonl, run_cli, write_jsonl
from test_server import API_KEY, Server, wait_for
from test_tools import render, smol_tokenizer

from tokenmill.endpoints.responses import Responses, ResponsesCall
from tokenmill.endpoints.responses_output import ResponsesStreamer, whole_response
from tokenmill.models.loader import default_model_path
from tokenmill.outputs import CompletionOutput, RequestOutput
from tokenmill.tools import HermesFormat, parse_tool_request

QUESTION = "Name three colours."
INSTRUCTIONS = "You answer in French."
SCHEMAS = {
    "get_weather": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "London"]}},
                    "required": ["city"], "additionalProperties": False},
    "get_time": {"type": "object", "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]},
                                                  "24h": {"type": "boolean"}}, "required": ["zone", "24h"]},
}
TOOLS = [{"type": "function", "name": name, "description": f"Calls {name}.", "parameters": schema, "strict": True}
         for name, schema in SCHEMAS.items()]
WEATHER_QUESTION = "What is the weather in Paris?"
STREAM_EVENTS = ["response.created", "response.in_progress", "response.output_item.added",
                 "response.content_part.added", "response.output_text.delta", "response.output_text.done",
                 "response.content_part.done", "response.output_item.done", "response.completed"]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    running = Server(default_model_path(), tmp_path_factory.mktemp("responses_server")).start()
    yield running
    running.kill()


def chat_text(client: openai.OpenAI, model: str, messages: list[dict], max_tokens: int) -> tuple[str, int]:
    """Chat completions' greedy text and prompt tokens for the same conversation."""
    chat = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0)
    assert chat.usage is not None
    return chat.choices[0].message.content or "", chat.usage.prompt_tokens


def test_text_input_cut_by_max_output_tokens_is_incomplete(client: openai.OpenAI, model: str) -> None:
    response = client.responses.create(model=model, input=QUESTION, max_output_tokens=8, temperature=0,
                                       metadata={"job": "test"}, store=False, user="u1", tools=[])
    assert response.object == "response" and response.id.startswith("resp_") and response.model == model
    assert response.status == "incomplete" and response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_output_tokens"
    (message,) = response.output
    assert message.type == "message" and message.role == "assistant" and message.status == "incomplete"
    assert message.id.startswith("msg_") and message.content[0].type == "output_text"
    text, prompt_tokens = chat_text(client, model, [{"role": "user", "content": QUESTION}], 8)
    assert response.output_text == text
    assert response.usage is not None and response.usage.output_tokens == 8
    assert response.usage.input_tokens == prompt_tokens
    assert response.usage.total_tokens == prompt_tokens + 8
    assert (response.max_output_tokens, response.temperature, response.metadata, response.user) == (8, 0.0,
                                                                                                     {"job": "test"},
                                                                                                     "u1")
    assert response.text is not None and response.text.format is not None and response.text.format.type == "text"
    assert response.tools == [] and response.tool_choice == "auto"


def test_instructions_and_message_items_are_the_chat_conversation(client: openai.OpenAI, model: str) -> None:
    messages = [{"role": "system", "content": INSTRUCTIONS}, {"role": "user", "content": QUESTION},
                {"role": "assistant", "content": "Rouge."}, {"role": "user", "content": "And two more?"}]
    text, prompt_tokens = chat_text(client, model, messages, 12)
    items = [{"role": "user", "content": [{"type": "input_text", "text": QUESTION}]},
             {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Rouge."}]},
             {"role": "user", "content": "And two more?"}]
    response = client.responses.create(model=model, instructions=INSTRUCTIONS, input=items, max_output_tokens=12,
                                       temperature=0)
    assert response.output_text == text and response.usage is not None
    assert response.usage.input_tokens == prompt_tokens and response.instructions == INSTRUCTIONS
    # A developer message is a system message; without it the template's default system prompt stands.
    developer = client.responses.create(model=model, input=[{"role": "developer", "content": INSTRUCTIONS}, *items],
                                        max_output_tokens=12, temperature=0)
    assert developer.output_text == text
    plain = client.responses.create(model=model, input=items, max_output_tokens=12, temperature=0)
    assert (plain.output_text, plain.usage.input_tokens) == chat_text(client, model, messages[1:], 12)
    assert plain.usage.input_tokens != prompt_tokens


class Colour(pydantic.BaseModel):
    name: Literal["red", "green", "blue"]
    warm: bool


def test_text_format_json_schema_parses(client: openai.OpenAI, model: str) -> None:
    parsed = client.responses.parse(model=model, input="Pick a colour.", text_format=Colour, max_output_tokens=40,
                                    temperature=0)
    assert parsed.status == "completed" and isinstance(parsed.output_parsed, Colour)
    assert parsed.text is not None and parsed.text.format is not None and parsed.text.format.type == "json_schema"
    free = client.responses.create(model=model, input="Pick a colour.", max_output_tokens=40, temperature=0)
    with pytest.raises(ValueError):  # the same request unconstrained is no such JSON
        Colour.model_validate_json(free.output_text)
    as_object = client.responses.create(model=model, input="Pick a colour.", max_output_tokens=8, temperature=0,
                                        text={"format": {"type": "json_object"}})
    assert as_object.output_text.startswith("{") and not free.output_text.startswith("{")
    with pytest.raises(openai.BadRequestError, match="text.format") as bad:
        client.responses.create(model=model, input="x", text={"format": {"type": "json_schema", "name": "x"}})
    assert bad.value.param == "text"


def test_stream_events_and_final_response_equal_non_streamed(server: Server, client: openai.OpenAI,
                                                             model: str) -> None:
    request = {"model": model, "input": QUESTION, "max_output_tokens": 64, "temperature": 0}
    stop = {"stop": ["Blue"]}  # ends the output before the limit: a completed response
    plain = client.responses.create(**request, extra_body=stop)
    assert plain.status == "completed" and plain.output_text
    with client.responses.stream(**request, extra_body=stop) as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [e.type for e in events]
    deltas = kinds.count("response.output_text.delta")
    assert deltas > 1 and kinds == STREAM_EVENTS[:4] + ["response.output_text.delta"] * deltas + STREAM_EVENTS[5:]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == plain.output_text
    assert final.output_text == plain.output_text and final.usage == plain.usage and final.status == "completed"
    assert final.output[0].id == events[2].item.id and "Blue" not in final.output_text
    # The SSE lines name each event as its data does; a cut stream ends with response.incomplete.
    body = json.dumps({**request, "max_output_tokens": 5, "stream": True}).encode()
    raw = urllib.request.Request(f"{server.url}/v1/responses", body, {"Authorization": f"Bearer {API_KEY}",
                                                                       "Content-Type": "application/json"})
    blocks = urllib.request.urlopen(raw).read().decode().strip().split("\n\n")
    named = [(b.split("\n")[0].removeprefix("event: "), json.loads(b.split("\n")[1].removeprefix("data: ")))
             for b in blocks]
    adapter = pydantic.TypeAdapter(openai.types.responses.ResponseStreamEvent)
    assert all(name == data["type"] == adapter.validate_python(data).type for name, data in named)
    last = named[-1][1]
    assert last["type"] == "response.incomplete" and last["response"]["incomplete_details"]["reason"] == \
        "max_output_tokens" and last["response"]["usage"]["output_tokens"] == 5


@pytest.mark.parametrize(("field", "value"), [
    ("previous_response_id", "resp_123"), ("conversation", "conv_1"), ("reasoning", {"effort": "low"}),
    ("include", ["reasoning.encrypted_content"]), ("background", True), ("truncation", "auto"), ("top_logprobs", 2),
    ("n", 2),
])
def test_fields_that_would_change_the_output_are_refused(client: openai.OpenAI, model: str, field: str,
                                                         value: object) -> None:
    with pytest.raises(openai.BadRequestError, match=field) as refused:
        client.responses.create(model=model, input=QUESTION, extra_body={field: value})
    assert refused.value.param == field


@pytest.mark.parametrize("item", [
    {"role": "user", "content": [{"type": "input_image", "image_url": "http://x/y.png"}]},
    {"type": "reasoning", "summary": []},
    {"role": "tool", "content": "x"},
    {"type": "function_call", "call_id": "call_1", "name": "f", "arguments": "not json"},
])
def test_bad_input_items_are_refused(client: openai.OpenAI, model: str, item: dict) -> None:
    with pytest.raises(openai.BadRequestError, match=r"input\[0\]") as refused:
        client.responses.create(model=model, input=[item])  # type: ignore[list-item]
    assert refused.value.param == "input"


def response_line(custom_id: str, max_output_tokens: int, **body: object) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/responses",
            "body": {"input": QUESTION, "max_output_tokens": max_output_tokens, "temperature": 0, **body}}


def test_batch_lines_through_tokenmill_run(tmp_path: Path, client: openai.OpenAI, model: str) -> None:
    lines = [response_line("plain", 6), response_line("instructed", 6, instructions=INSTRUCTIONS),
             response_line("refused", 6, previous_response_id="resp_1")]
    output = tmp_path / "out.jsonl"
    run_cli(write_jsonl(tmp_path / "in.jsonl", lines), "-o", output, "--dtype", "float32")
    records = {r["custom_id"]: r["response"]["body"] for r in read_jsonl(output)}
    (error,) = read_jsonl(tmp_path / "out.errors.jsonl")
    assert error["custom_id"] == "refused" and "previous_response_id" in error["error"]["message"]
    for line in lines[:2]:
        body = records[line["custom_id"]]
        served = client.responses.create(model=model, **line["body"])  # type: ignore[arg-type]
        assert body["object"] == "response" and body["id"].startswith("resp_") and body["status"] == "incomplete"
        assert openai.types.responses.Response.model_validate(body).output_text == served.output_text
    assert records["plain"]["output"][0]["content"][0]["text"] != records["instructed"]["output"][0]["content"][0][
        "text"]


def test_server_batch_of_responses(tmp_path: Path, client: openai.OpenAI) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", [response_line(f"r{i}", 4) for i in range(3)])
    uploaded = client.files.create(file=path.open("rb"), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/responses", completion_window="24h")
    done = wait_for(client, batch.id, ("completed", "failed"))
    assert done.status == "completed" and done.request_counts.completed == 3  # type: ignore[attr-defined]
    results = [json.loads(line) for line in client.files.content(done.output_file_id).text.splitlines()]  # type: ignore[attr-defined]
    assert sorted(r["custom_id"] for r in results) == ["r0", "r1", "r2"]
    assert all(r["response"]["body"]["usage"]["output_tokens"] == 4 for r in results)


def test_required_and_named_tool_choice_give_calls_that_validate(client: openai.OpenAI, model: str) -> None:
    request = {"model": model, "input": WEATHER_QUESTION, "tools": TOOLS, "max_output_tokens": 60, "temperature": 0}
    required = client.responses.create(**request, tool_choice="required", parallel_tool_calls=False)
    (call,) = required.output
    assert call.type == "function_call" and call.call_id.startswith("call_") and call.id.startswith("fc_")
    assert call.name in SCHEMAS and call.status == "completed" and required.status == "completed"
    jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])
    assert required.output_text == "" and required.tool_choice == "required" and not required.parallel_tool_calls
    named = client.responses.create(**request, tool_choice={"type": "function", "name": "get_time"})
    (call,) = named.output
    assert call.type == "function_call" and call.name == "get_time"
    jsonschema.validate(json.loads(call.arguments), SCHEMAS["get_time"])
    with client.responses.stream(**request, tool_choice={"type": "function", "name": "get_time"}) as stream:
        events = list(stream)
        final = stream.get_final_response()
    assert [e.type for e in events] == ["response.created", "response.in_progress", "response.output_item.added",
                                        "response.function_call_arguments.delta",
                                        "response.function_call_arguments.done", "response.output_item.done",
                                        "response.completed"]
    (streamed,) = final.output
    assert streamed.type == "function_call" and (streamed.name, streamed.arguments) == (call.name, call.arguments)
    assert events[2].item.id == streamed.id and events[4].arguments == call.arguments


def test_a_function_call_output_round_trip_is_the_chat_conversation(client: openai.OpenAI, model: str) -> None:
    first = client.responses.create(model=model, input=WEATHER_QUESTION, tools=TOOLS, tool_choice="required",
                                    parallel_tool_calls=False, max_output_tokens=60, temperature=0)
    (call,) = first.output
    assert call.type == "function_call"
    result = {"type": "function_call_output", "call_id": call.call_id, "output": "22 degrees and sunny"}
    follow = client.responses.create(model=model, input=[{"role": "user", "content": WEATHER_QUESTION},
                                                         *first.output, result],  # type: ignore[list-item]
                                     tools=TOOLS, tool_choice="none", max_output_tokens=12, temperature=0)
    (message,) = follow.output
    assert message.type == "message" and follow.output_text and follow.usage is not None
    # The prompt is the chat conversation with the call and its result, tokens for tokens.
    chat_call = {"id": call.call_id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
    messages = [{"role": "user", "content": WEATHER_QUESTION},
                {"role": "assistant", "content": None, "tool_calls": [chat_call]},
                {"role": "tool", "tool_call_id": call.call_id, "content": "22 degrees and sunny"}]
    chat_tools = {"tools": [{"type": "function", "function": {"name": t["name"], "description": t["description"],
                                                              "parameters": t["parameters"], "strict": True}}
                            for t in TOOLS], "tool_choice": "none"}
    tokenizer = smol_tokenizer()
    prompt = render(tokenizer, messages, parse_tool_request(chat_tools))
    assert "22 degrees and sunny" in prompt and call.arguments in prompt
    assert follow.usage.input_tokens == len(tokenizer.encode(prompt, add_special_tokens=False))


def test_a_text_format_binds_a_text_reply_only(client: openai.OpenAI, model: str) -> None:
    """With tools, text.format constrains a text reply: "required" still calls, "auto" either calls
    or answers in the format (a server that ignored the format would let prose through)."""
    schema = {"type": "object", "properties": {"colour": {"type": "string", "maxLength": 12}},
              "required": ["colour"], "additionalProperties": False}
    text = {"format": {"type": "json_schema", "name": "colour", "schema": schema, "strict": True}}
    request = {"model": model, "tools": TOOLS, "max_output_tokens": 60, "temperature": 0, "text": text}
    required = client.responses.create(**request, input=WEATHER_QUESTION, tool_choice="required",
                                       parallel_tool_calls=False)
    assert [item.type for item in required.output] == ["function_call"]
    for question in (QUESTION, WEATHER_QUESTION, "Reply with your favourite colour."):
        # NOTE: one call at most: with parallel calls this model repeats its call until max_output_tokens.
        reply = client.responses.create(**request, input=question, tool_choice="auto", parallel_tool_calls=False)
        assert reply.status == "completed", reply
        if any(item.type == "function_call" for item in reply.output):
            for item in reply.output:
                assert item.type == "function_call"
                jsonschema.validate(json.loads(item.arguments), SCHEMAS[item.name])
        else:
            jsonschema.validate(json.loads(reply.output_text), schema)


@pytest.mark.parametrize(("body", "param"), [
    ({"tools": [{"type": "web_search"}]}, "tools"),
    ({"tools": [{"type": "file_search", "vector_store_ids": ["vs_1"]}]}, "tools"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "web_search_preview"}}, "tool_choice"),
    ({"tools": [{**TOOLS[0], "name": "bad name"}]}, "tools"),
    ({"tools": TOOLS, "tool_choice": "required", "structured_outputs": {"regex": "a+"}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
])
def test_tools_that_cannot_be_served_are_refused(client: openai.OpenAI, model: str, body: dict, param: str) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(model=model, input=QUESTION, extra_body=body)
    assert refused.value.param == param and ".function." not in str(refused.value)



REPLY = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
         '<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC", "24h": true}}\n</tool_call>')


def prepared(body: dict) -> ResponsesCall:
    call = Responses().parse(body)
    call.tool_format = HermesFormat(template_renders_tools=False)  # SmolLM2's
    return call


def output_of(text: str, finish_reason: str | None) -> RequestOutput:
    return RequestOutput("resp-abc", None, [1, 2, 3], [CompletionOutput(0, text, list(range(len(text))),
                                                                        finish_reason)])


def streamed_events(body: dict, text: str, piece: int, finish_reason: str) -> list[dict]:
    """The events of `text` streamed `piece` characters at a time, each validated by the SDK's types."""
    streamer = ResponsesStreamer(prepared(body), "resp-abc", "m")
    raw = streamer.start()
    for end in [*range(piece, len(text), piece), len(text)]:
        raw += streamer.update(0, output_of(text[:end], finish_reason if end == len(text) else None))
    raw += streamer.finish([output_of(text, finish_reason)])
    events = [json.loads(e.split("\ndata: ")[1]) for e in raw]
    adapter = pydantic.TypeAdapter(openai.types.responses.ResponseStreamEvent)
    assert all(adapter.validate_python(e).type == e["type"] == e_raw.split("\n")[0].removeprefix("event: ")
               for e, e_raw in zip(events, raw))
    return events


def calls_and_text(response: dict) -> tuple[list, str]:
    """A response's output without the call ids (fresh in every parse)."""
    parsed = openai.types.responses.Response.model_validate(response)
    return [(o.type, o.status, getattr(o, "name", None), getattr(o, "arguments", None)) for o in parsed.output], \
        parsed.output_text


@pytest.mark.parametrize("piece", [1, 3, 7, 1000])
@pytest.mark.parametrize("finish_reason", ["stop", "length"])
@pytest.mark.parametrize("tail", ["", "\nDone."])
def test_text_and_parallel_calls_stream_as_items_and_agree_with_the_whole(piece: int, finish_reason: str,
                                                                          tail: str) -> None:
    body = {"input": WEATHER_QUESTION, "tools": TOOLS, "stop": ["never"]}
    events = streamed_events(body, REPLY + tail, piece, finish_reason)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    status = "completed" if finish_reason == "stop" else "incomplete"
    assert events[-1]["type"] == f"response.{status}" and events[-1]["response"]["status"] == status
    items, text = calls_and_text(events[-1]["response"])
    calls = [("function_call", "completed", "get_weather", '{"city": "Paris"}'),
             ("function_call", "completed", "get_time", '{"zone": "UTC", "24h": true}')]
    if tail:  # text after the calls: a message of its own
        assert text == "Let me check.\n" + tail and items == [("message", "completed", None, None), *calls,
                                                              ("message", status, None, None)]
    else:
        assert text == "Let me check.\n" and items == [("message", "completed", None, None), *calls]
    added = [e["item"]["id"] for e in events if e["type"] == "response.output_item.added"]
    assert added == [o["id"] for o in events[-1]["response"]["output"]] and len(set(added)) == len(added)
    assert calls_and_text(whole_response(prepared(body), output_of(REPLY + tail, finish_reason), "resp-abc",
                                         "m")) == (items, text)
