"""Tool calling's core (tokenmill/tools/): requests checked as OpenAI checks them, tools rendered into
the real SmolLM2 prompt and through a tools-aware template, the required/named grammar on the real
engine (its calls validate against their schemas), and the reply parser, whole and streamed."""

from __future__ import annotations

import copy
import json
import random
from typing import Any

import jsonschema
import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from tokenmill import LLM, SamplingParams
from tokenmill.errors import RequestError
from tokenmill.models.loader import default_model_path
from tokenmill.tools import (
    AssistantReply,
    HermesFormat,
    Llama3JsonFormat,
    ToolCallFormat,
    ToolCallStream,
    ToolRequest,
    parse_reply,
    parse_tool_request,
    prepare_chat,
    tool_call_format,
    tool_constraint,
)

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city"]}}}
ADD = {"type": "function", "function": {
    "name": "add", "description": "Adds two integers",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer", "minimum": -1000, "maximum": 1000},
                                                    "b": {"type": "integer", "minimum": -1000, "maximum": 1000}},
                   "required": ["a", "b"]}}}
TOOLS = [WEATHER, ADD]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
QUESTION = {"role": "user", "content": "What is the weather in Paris, and what is 2 + 3?"}

# Qwen2.5's template, cut to what these tests use (its tool branches as Qwen writes them).
QWEN_STYLE_TEMPLATE = """\
{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}
    {%- else %}{{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}{%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided \
with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}{{- "\\n" }}{{- tool | tojson }}{%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within \
<tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\
\\n</tool_call><|im_end|>\\n" }}
{%- elif messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if message.role == "user" or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}{{- '\\n' + message.content }}{%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}{{- tool_call.name }}{{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}{{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}{{- '<|im_start|>user' }}{%- endif %}
        {{- '\\n<tool_response>\\n' }}{{- message.content }}{{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}{{- '<|im_end|>\\n' }}{%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}
"""
# How the Llama 3.1 templates write a call, and their custom-tool instruction.
LLAMA_STYLE_TEMPLATE = """\
{%- if tools is not none %}{{- 'Respond in the format {"name": function name, "parameters": dictionary of argument \
name and its value}.' }}{%- endif %}
{%- for message in messages %}{%- if message.tool_calls %}{%- set tool_call = message.tool_calls[0].function %}
{{- '<|python_tag|>{"name": "' + tool_call.name + '", "parameters": ' + tool_call.arguments | tojson + '}' }}
{%- else %}{{- message.role + ': ' + message.content + '\\n' }}{%- endif %}{%- endfor %}
"""


def request(**body: Any) -> ToolRequest:
    parsed = parse_tool_request({"tools": TOOLS, **body})
    assert parsed is not None
    return parsed


def smol_tokenizer() -> PreTrainedTokenizerBase:
    gguf = default_model_path()
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerBase:
    return smol_tokenizer()


@pytest.fixture(scope="module")
def qwen_style_tokenizer() -> PreTrainedTokenizerBase:
    tokenizer = smol_tokenizer()
    tokenizer.chat_template = QWEN_STYLE_TEMPLATE
    return tokenizer


def render(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]], tools: ToolRequest | None) -> str:
    prepared, kwargs = prepare_chat(tool_call_format(tokenizer), messages, tools)
    return tokenizer.apply_chat_template(prepared, tokenize=False, add_generation_prompt=True, **kwargs)


# --- the request ---------------------------------------------------------------------------------

def test_a_request_without_tools_has_none_and_the_defaults_are_openais() -> None:
    assert parse_tool_request({"messages": []}) is None
    assert parse_tool_request({"parallel_tool_calls": False}) is None
    parsed = request()
    assert (parsed.choice, parsed.function, parsed.parallel) == ("auto", None, True)
    assert [t.name for t in parsed.callable_tools] == ["get_weather", "add"] and parsed.definitions == TOOLS
    named = request(tool_choice={"type": "function", "function": {"name": "add"}}, parallel_tool_calls=False)
    assert (named.choice, named.function, named.parallel) == ("function", "add", False)
    assert [t.name for t in named.callable_tools] == ["add"]
    assert request(tool_choice="none").callable_tools == ()
    assert request(tool_choice="required").choice == "required"


def test_a_function_without_parameters_takes_an_object() -> None:
    parsed = parse_tool_request({"tools": [{"type": "function", "function": {"name": "now"}}]})
    assert parsed is not None and parsed.tools[0].parameters == {"type": "object"}


@pytest.mark.parametrize(("body", "param", "words"), [
    ({"tool_choice": "auto"}, "tool_choice", "only allowed when body.tools"),
    ({"tools": []}, "tools", "non-empty list"),
    ({"tools": {"name": "add"}}, "tools", "non-empty list"),
    ({"tools": [{"type": "custom", "custom": {"name": "x"}}]}, "tools", "must be a function tool"),
    ({"tools": [{"type": "function"}]}, "tools", "function must be an object"),
    ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools", "1 to 64 letters"),
    ({"tools": [{"type": "function", "function": {"name": "x" * 65}}]}, "tools", "1 to 64 letters"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]}, "tools",
     "JSON schema of an object"),
    ({"tools": [{"type": "function", "function": {"name": "f", "description": 3}}]}, "tools", "description"),
    ({"tools": [ADD, ADD]}, "tools", "two functions named 'add'"),
    ({"tools": TOOLS, "tool_choice": "always"}, "tool_choice", "must be \"none\", \"auto\""),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "mul"}}}, "tool_choice",
     "'mul', which is not in body.tools"),
    ({"tools": TOOLS, "parallel_tool_calls": "yes"}, "parallel_tool_calls", "must be a boolean"),
])
def test_malformed_tool_fields_are_refused_naming_the_field(body: dict[str, Any], param: str, words: str) -> None:
    with pytest.raises(RequestError) as raised:
        parse_tool_request(body)
    assert raised.value.param == param and words in raised.value.message


# --- the format and the prompt ----------------------------------------------------------------

def test_the_format_is_read_from_the_chat_template(tokenizer: PreTrainedTokenizerBase,
                                                   qwen_style_tokenizer: PreTrainedTokenizerBase) -> None:
    smol = tool_call_format(tokenizer)  # SmolLM2's template says nothing of tools: Hermes, rewritten
    assert isinstance(smol, HermesFormat) and not smol.template_renders_tools
    qwen = tool_call_format(qwen_style_tokenizer)
    assert isinstance(qwen, HermesFormat) and qwen.template_renders_tools
    llama_tokenizer = smol_tokenizer()
    llama_tokenizer.chat_template = LLAMA_STYLE_TEMPLATE
    llama = tool_call_format(llama_tokenizer)
    assert isinstance(llama, Llama3JsonFormat) and llama.template_renders_tools


def test_tools_reach_smollm2s_prompt(tokenizer: PreTrainedTokenizerBase) -> None:
    plain = render(tokenizer, [QUESTION], None)
    for choice in ("auto", "none", "required"):  # "none" still shows the tools, as OpenAI does
        text = render(tokenizer, [QUESTION], request(tool_choice=choice))
        assert len(tokenizer.encode(text)) > len(tokenizer.encode(plain)) + 100
        assert all(json.dumps(t, ensure_ascii=False) in text for t in TOOLS)
        assert text.startswith("<|im_start|>system\n# Tools\n")
        assert text.endswith(QUESTION["content"] + "<|im_end|>\n<|im_start|>assistant\n")


def follow_up(system: bool, said: str | None = None) -> list[dict[str, Any]]:
    return [*([{"role": "system", "content": "You are terse."}] if system else []), QUESTION,
            {"role": "assistant", "content": said, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                                  "arguments": "{\"city\": \"Paris\"}"}},
                {"id": "call_2", "type": "function", "function": {"name": "add", "arguments": "{\"a\":2,\"b\":3}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "{\"temperature\": 21}"},
            {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "5"}]}]


def test_a_follow_up_turn_renders_for_smollm2(tokenizer: PreTrainedTokenizerBase) -> None:
    messages = follow_up(system=True)
    before = json.dumps(messages)
    text = render(tokenizer, messages, request())
    assert json.dumps(messages) == before  # the request's messages are left as they were
    assert text.count("<|im_start|>system\n") == 1 and text.startswith("<|im_start|>system\nYou are terse.\n\n# Tools")
    assert ('<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
            '</tool_call>\n<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call><|im_end|>\n'
            '<|im_start|>user\n<tool_response>\n{"temperature": 21}\n</tool_response>\n<tool_response>\n5\n'
            '</tool_response><|im_end|>\n<|im_start|>assistant\n') in text
    # A follow-up without tools in the request still renders its calls and results.
    assert "<tool_response>" in render(tokenizer, follow_up(system=False), None)


@pytest.mark.parametrize("said", [None, "", "Let me check."])
def test_a_tools_aware_template_renders_what_the_rewrite_writes(tokenizer: PreTrainedTokenizerBase,
                                                                qwen_style_tokenizer: PreTrainedTokenizerBase,
                                                                said: str | None) -> None:
    """Qwen2.5's template, given tools= and the calls as objects, writes the same prompt as SmolLM2's
    ChatML template given the conversation rewritten in the Hermes format."""
    through_template = render(qwen_style_tokenizer, follow_up(True, said), request())
    assert '"arguments": {"city": "Paris"}' in through_template  # an object, not the JSON text quoted
    assert ("<|im_start|>assistant\nLet me check.\n<tool_call>" in through_template) == bool(said)
    assert through_template == render(tokenizer, follow_up(True, said), request())


def test_the_llama_format_rewrites_in_its_own_words(tokenizer: PreTrainedTokenizerBase) -> None:
    prepared, kwargs = prepare_chat(Llama3JsonFormat(False), follow_up(system=False), request())
    assert kwargs == {} and prepared[0]["role"] == "system" and '"parameters": dictionary' in prepared[0]["content"]
    assert prepared[2]["content"] == ('{"name": "get_weather", "parameters": {"city": "Paris"}}; '
                                      '{"name": "add", "parameters": {"a": 2, "b": 3}}')
    assert prepared[3] == {"role": "ipython", "content": "{\"temperature\": 21}\n5"}
    assert "ipython" in tokenizer.apply_chat_template(prepared, tokenize=False)


@pytest.mark.parametrize("call", [{"function": {"name": "add", "arguments": "{not json"}},
                                  {"function": {"name": "add", "arguments": "[1]"}},
                                  {"function": {"arguments": "{}"}}, "add"])
def test_a_malformed_assistant_call_is_refused(tokenizer: PreTrainedTokenizerBase, call: Any) -> None:
    messages = [QUESTION, {"role": "assistant", "content": None, "tool_calls": [call]}]
    with pytest.raises(RequestError) as raised:
        prepare_chat(tool_call_format(tokenizer), messages, request())
    assert raised.value.param == "messages" and "messages[1].tool_calls[0]" in raised.value.message


# --- the grammar on the real engine -------------------------------------------------------------

def test_only_required_and_named_choices_are_constrained() -> None:
    assert tool_constraint(HermesFormat(False), request()) is None
    assert tool_constraint(HermesFormat(False), request(tool_choice="none")) is None
    bad = parse_tool_request({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "string", "pattern": "(("}}}}}], "tool_choice": "required"})
    assert bad is not None
    with pytest.raises(RequestError) as raised:
        tool_constraint(HermesFormat(False), bad)
    assert raised.value.param == "tools" and "tools[0].function.parameters" in raised.value.message


def test_required_and_named_calls_always_parse_and_validate(smol_llm: LLM) -> None:
    cases: list[tuple[ToolCallFormat, ToolRequest]] = [
        *[(HermesFormat(False), request(tool_choice="required"))] * 3,
        (HermesFormat(False), request(tool_choice="required", parallel_tool_calls=False)),
        (HermesFormat(False), request(tool_choice={"type": "function", "function": {"name": "add"}})),
        (Llama3JsonFormat(False), request(tool_choice="required")),
        (Llama3JsonFormat(False), request(tool_choice={"type": "function", "function": {"name": "get_weather"}})),
    ]
    conversations, params = [], []
    for i, (fmt, tools) in enumerate(cases):
        messages, kwargs = prepare_chat(fmt, [QUESTION], tools)
        assert kwargs == {}
        conversations.append(messages)
        params.append(SamplingParams(temperature=0 if i == 0 else 1.0, seed=i, max_tokens=120,
                                     structured_outputs=tool_constraint(fmt, tools)))
    outputs = smol_llm.chat(conversations, params, use_tqdm=False)
    for (fmt, tools), output in zip(cases, outputs):
        completion = output.outputs[0]
        assert completion.finish_reason == "stop", completion.text
        reply = parse_reply(fmt, tools, completion.text)
        assert reply.content is None and reply.tool_calls, completion.text
        assert reply.finish_reason("stop") == "tool_calls"
        if not tools.parallel or tools.choice == "function":
            assert len(reply.tool_calls) == 1
        for call in reply.tool_calls:
            assert call.name in {t.name for t in tools.callable_tools} and call.id.startswith("call_")
            jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])
        assert streamed(fmt, tools, split_randomly(completion.text, random.Random(0))) == openai_reply(reply)


# --- the parser ---------------------------------------------------------------------------------

HERMES = HermesFormat(False)
LLAMA = Llama3JsonFormat(True)


def call(name: str, arguments: dict[str, Any]) -> tuple[str, str]:
    return name, json.dumps(arguments)


@pytest.mark.parametrize(("fmt", "text", "content", "calls"), [
    (HERMES, "Hello there.", "Hello there.", []),
    (HERMES, '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>', None,
     [call("add", {"a": 1, "b": 2})]),
    (HERMES, 'I will look.\n<tool_call>\n{"name":"get_weather","arguments":{"city":"Oslo"}}\n</tool_call>\n'
             '<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>  ',
     "I will look.\n  ", [call("get_weather", {"city": "Oslo"}), call("add", {"a": 1, "b": 2})]),
    (HERMES, '<tool_call>\n{"name": "add", "arguments": {"a": 1}}\n</tool_call> and then <tool_call>\n'
             '{"name": "add", "arguments": {"a": 2}}\n</tool_call>', " and then ",
     [call("add", {"a": 1}), call("add", {"a": 2})]),
    (HERMES, '<tool_call>\n{"name": "add", "arguments": {"a": 1,}}\n</tool_call>',  # malformed JSON
     '<tool_call>\n{"name": "add", "arguments": {"a": 1,}}\n</tool_call>', []),
    (HERMES, '<tool_call>\n{"name": "mul", "arguments": {}}\n</tool_call>',  # not a function offered
     '<tool_call>\n{"name": "mul", "arguments": {}}\n</tool_call>', []),
    (HERMES, '<tool_call>\n{"name": "add", "arguments": "{}"}\n</tool_call>',  # arguments not an object
     '<tool_call>\n{"name": "add", "arguments": "{}"}\n</tool_call>', []),
    (HERMES, '<tool_call>\n{"name": "add", "arguments": {}}\n</tool_call>\n<tool_call>\n{"name": "add", "argu',
     '\n<tool_call>\n{"name": "add", "argu', [call("add", {})]),  # unfinished at the end: content
    (HERMES, 'So: <tool_call>\n{"name": "add", "arguments": {"a": 7}}\n', "So: ",  # complete but unclosed: a call
     [call("add", {"a": 7})]),
    (HERMES, '<tool_call>\n{"name": "add", "argu<tool_call>\n{"name": "add", "arguments": {"a": 7}}</tool_call>',
     '<tool_call>\n{"name": "add", "argu', [call("add", {"a": 7})]),  # a second try after a broken start
    (HERMES, 'a < b, <tool_ and <tool_call', "a < b, <tool_ and <tool_call", []),
    (HERMES, " \n ", None, []),
    (LLAMA, '{"name": "add", "parameters": {"a": 1, "b": 2}}', None, [call("add", {"a": 1, "b": 2})]),
    (LLAMA, '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Rome {x}"}}; '
            '{"name": "add", "arguments": {"a": 3, "b": 4}}',
     None, [call("get_weather", {"city": "Rome {x}"}), call("add", {"a": 3, "b": 4})]),
    (LLAMA, 'The answer is {"name": "Bob"}; {"name": "add", "parameters": {"a": 1}}',
     'The answer is {"name": "Bob"}; ', [call("add", {"a": 1})]),
    (LLAMA, '<|python_tag|>print(1)', "<|python_tag|>print(1)", []),
    (LLAMA, '{"name": "add", "parameters": {"a": "}"', '{"name": "add", "parameters": {"a": "}"', []),
])
def test_replies_parse_into_content_and_calls(fmt: ToolCallFormat, text: str, content: str | None,
                                              calls: list[tuple[str, str]]) -> None:
    reply = parse_reply(fmt, request(), text)
    assert reply.content == content
    assert [(c.name, c.arguments) for c in reply.tool_calls] == calls
    assert len({c.id for c in reply.tool_calls}) == len(calls)
    assert reply.finish_reason("stop") == ("tool_calls" if calls else "stop")
    assert reply.finish_reason("length") == "length"
    message = reply.message()
    assert message["content"] == content and ("tool_calls" in message) == bool(calls)


def test_parallel_false_keeps_the_first_call_and_none_keeps_the_text() -> None:
    text = ('<tool_call>\n{"name": "add", "arguments": {"a": 1}}\n</tool_call>\n'
            '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>')
    single = parse_reply(HERMES, request(parallel_tool_calls=False), text)
    assert single.content is None and [(c.name, c.arguments) for c in single.tool_calls] == [call("add", {"a": 1})]
    named = parse_reply(HERMES, request(tool_choice={"type": "function", "function": {"name": "get_weather"}}), text)
    assert named.content is not None and named.content.startswith("<tool_call>\n{\"name\": \"add\"")
    assert [c.name for c in named.tool_calls] == ["get_weather"]
    untouched = parse_reply(HERMES, request(tool_choice="none"), text + "\n")
    assert untouched == AssistantReply(text + "\n", [])


def split_randomly(text: str, rng: random.Random) -> list[str]:
    pieces, i = [], 0
    while i < len(text):
        size = rng.randint(1, 3)
        pieces.append(text[i:i + size])
        i += size
    return pieces


def streamed(fmt: ToolCallFormat, tools: ToolRequest, pieces: list[str]) -> dict[str, Any]:
    """A reply put together from its stream's deltas, as an OpenAI client puts it together."""
    stream = ToolCallStream(fmt, tools)
    return absorb([d for piece in pieces for d in stream.feed(piece)] + stream.finish(), None, [])


def absorb(deltas: list[dict[str, Any]], content: str | None, calls: list[dict[str, str]]) -> dict[str, Any]:
    """The reply so far (content, calls) with deltas added, each checked to be shaped as OpenAI's."""
    calls = [dict(c) for c in calls]
    for delta in deltas:
        assert len(delta) == 1 and delta.get("content", "x") != ""
        if "content" in delta:
            content = (content or "") + delta["content"]
            continue
        (entry,) = delta["tool_calls"]
        if "id" in entry:
            assert entry["index"] == len(calls) and entry["type"] == "function"
            assert entry["function"]["arguments"] == ""
            calls.append({"name": entry["function"]["name"], "arguments": ""})
        else:
            assert entry["index"] == len(calls) - 1 and set(entry["function"]) == {"arguments"}
            calls[-1]["arguments"] += entry["function"]["arguments"]
    return {"content": content, "calls": calls}


def openai_reply(reply: AssistantReply) -> dict[str, Any]:
    return {"content": reply.content, "calls": [{"name": c.name, "arguments": c.arguments} for c in reply.tool_calls]}


def check_every_small_split(fmt: ToolCallFormat, tools: ToolRequest, text: str, whole: dict[str, Any]) -> int:
    """Streams `text` split into pieces of 1 to 3 characters in every possible way (3^n / 2 ways for
    n characters, about), and checks each adds up to `whole`. NOTE: two ways that reach the same
    point in the text with the same parser state and the same reply so far go on alike, so each
    such point is explored once: that keeps it exhaustive and linear. Returns the points explored."""
    seen: set[tuple[Any, ...]] = set()

    def state(stream: ToolCallStream) -> str:
        fields = {**vars(stream), "_content": "".join(stream._content)}  # however it came in pieces
        del fields["_calls"]  # their ids differ, fresh each time
        return json.dumps([fields, [(c.name, c.arguments) for c in stream._calls]], default=repr)

    def visit(at: int, stream: ToolCallStream, sofar: dict[str, Any]) -> None:
        if at == len(text):
            assert absorb(copy.deepcopy(stream).finish(), sofar["content"], sofar["calls"]) == whole
            return
        for size in (1, 2, 3)[:len(text) - at]:
            branch = copy.deepcopy(stream)
            reply = absorb(branch.feed(text[at:at + size]), sofar["content"], sofar["calls"])
            key = (at + size, state(branch), json.dumps(reply))
            if key not in seen:
                seen.add(key)
                visit(at + size, branch, reply)

    visit(0, ToolCallStream(fmt, tools), {"content": None, "calls": []})
    return len(seen)


STREAM_TEXTS = [
    (HERMES, 'Let me see.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
             '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>\nDone <tool'),
    (HERMES, '  <tool_call>{"name": "add", "arguments": {"a": 1,}}</tool_call> <tool_call>\n'
             '{"name": "add", "arguments": {"a": 1}}\n</tool_call>'),
    (HERMES, '<tool_call>\n{"name": "add", "arguments": {"a": 1}}\n</tool_call>\n\n<tool_call'),
    (HERMES, 'Hm <tool_call>{"name": "add", "a<tool_call>{"name": "add", "arguments": {"b": 1}}\n '),
    (LLAMA, 'x <|python_tag|>{"name": "add", "parameters": {"a": "\\"}"}}; ; {"name": "get_weather", '
            '"parameters": {"city": "Rome"}} ;'),
    (LLAMA, '{"name": "add", "parameters": {"a": 1}} {"name": "add"'),
]


@pytest.mark.parametrize(("fmt", "text"), STREAM_TEXTS)
def test_streamed_deltas_add_up_to_the_parsed_reply(fmt: ToolCallFormat, text: str) -> None:
    tools = request()
    whole = openai_reply(parse_reply(fmt, tools, text))
    assert whole["calls"]  # every text here holds calls
    splits = [[text[:i], text[i:]] for i in range(len(text) + 1)]  # every split in two
    splits += [[text[i:i + size] for i in range(0, len(text), size)] for size in (1, 2, 3, 5, 8, 13)]
    for pieces in splits:
        assert streamed(fmt, tools, pieces) == whole, pieces
    assert check_every_small_split(fmt, tools, text, whole) >= len(text)


def test_plain_text_streams_as_it_comes() -> None:
    stream = ToolCallStream(HERMES, request())
    assert stream.feed("Hello") == [{"content": "Hello"}]
    assert stream.feed(" wor") == [{"content": " wor"}]
    assert stream.feed("ld <tool_") == [{"content": "ld "}]  # what may open a call is held back
    assert stream.feed("box>") == [{"content": "<tool_box>"}]
    assert stream.finish() == []


def test_llm_chat_takes_tools_and_follow_up_turns(smol_llm: LLM) -> None:
    """vLLM's `LLM.chat(..., tools=...)`: the tools reach the prompt in the model's format, and a
    follow-up turn (calls with content null, tool results) renders, as the server renders them."""
    params = SamplingParams(temperature=0, max_tokens=4)
    plain, with_tools = smol_llm.chat([[QUESTION], [QUESTION]], params, use_tqdm=False), \
        smol_llm.chat([QUESTION], params, use_tqdm=False, tools=TOOLS)
    assert plain[0].prompt == plain[1].prompt and "get_weather" not in (plain[0].prompt or "")
    prompt = with_tools[0].prompt or ""
    assert "get_weather" in prompt and '"name": "add"' in prompt
    assert len(with_tools[0].prompt_token_ids) > len(plain[0].prompt_token_ids) + 100
    (answered,) = smol_llm.chat(follow_up(system=False), params, use_tqdm=False, tools=TOOLS)
    assert answered.error is None and "<tool_response>" in (answered.prompt or "")
    with pytest.raises(RequestError, match="tools"):
        smol_llm.chat([QUESTION], params, use_tqdm=False, tools=[{"type": "function"}])
