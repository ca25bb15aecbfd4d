"""`/v1/completions` and `/v1/chat/completions` fields as clients send them, through the official
`openai` client against a real `tokenmill serve`: prompt lists, echo with prompt logprobs, best_of,
logit_bias, compact json_object, and a 400 for every field that would change the output but is not
supported. Each test fails on a server that ignores the field under test."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from test_batch import read_jsonl, run_cli, write_jsonl
from test_server import Server

from tokenmill import LLM
from tokenmill.endpoints import COMPLETIONS_URL, ENDPOINTS

PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_models: dict[str, Path]) -> Iterator[Server]:
    running = Server(tiny_models["llama"], tmp_path_factory.mktemp("server")).start()
    yield running
    running.kill()


def greedy(client: openai.OpenAI, model: str, prompt: str | list[int], **kwargs: object) -> str:
    settings: dict = {"max_tokens": 6, "temperature": 0, **kwargs}
    return client.completions.create(model=model, prompt=prompt, **settings).choices[0].text


def test_prompt_lists_answer_each_prompt_as_its_own_choices(client: openai.OpenAI, model: str) -> None:
    ids = [1, 450, 4996, 17354]
    prompts: list[str | list[int]] = [PROMPT, ids, "Once upon a time"]
    alone = [greedy(client, model, p) for p in prompts]
    both = client.completions.create(model=model, prompt=prompts, max_tokens=6, temperature=0, n=2)  # type: ignore[arg-type]
    assert [c.index for c in both.choices] == [0, 1, 2, 3, 4, 5]
    assert [c.text for c in both.choices] == [text for text in alone for _ in range(2)]
    assert both.usage is not None and both.usage.completion_tokens == 6 * 6
    tokens = client.completions.create(model=model, prompt=[ids, ids[:2]], max_tokens=6, temperature=0)
    assert tokens.choices[0].text == alone[1] and len(tokens.choices) == 2

    streamed = ["", "", ""]
    for chunk in client.completions.create(model=model, prompt=prompts, max_tokens=6, temperature=0, stream=True):  # type: ignore[arg-type]
        for choice in chunk.choices:
            streamed[choice.index] += choice.text
    assert streamed == alone


def test_echo_returns_the_prompt_and_its_logprobs(client: openai.OpenAI, model: str, server: Server) -> None:
    prompt_ids = client.completions.create(model=model, prompt=PROMPT, max_tokens=1, temperature=0).usage
    assert prompt_ids is not None
    count = prompt_ids.prompt_tokens
    scored = client.completions.create(model=model, prompt=PROMPT, max_tokens=0, echo=True, logprobs=2)
    choice = scored.choices[0]
    assert choice.text == PROMPT and choice.finish_reason == "length"
    logprobs = choice.logprobs
    assert logprobs is not None and logprobs.token_logprobs is not None and logprobs.top_logprobs is not None
    assert len(logprobs.token_logprobs) == count and logprobs.token_logprobs[0] is None
    assert all(lp is not None and lp <= 0 for lp in logprobs.token_logprobs[1:])
    assert "".join(logprobs.tokens or []) == PROMPT and logprobs.text_offset == sorted(logprobs.text_offset or [])
    # The prompt scored as the same prompt generated from: a one-token completion after it agrees.
    generated = client.completions.create(model=model, prompt=PROMPT, max_tokens=1, echo=True, logprobs=2,
                                          temperature=0).choices[0]
    assert generated.logprobs is not None and generated.logprobs.token_logprobs is not None
    assert generated.text.startswith(PROMPT) and len(generated.logprobs.token_logprobs) == count + 1
    assert generated.logprobs.token_logprobs[:count] == pytest.approx(logprobs.token_logprobs, abs=1e-4)
    top = generated.logprobs.top_logprobs[-1]  # type: ignore[index]
    assert generated.logprobs.token_logprobs[-1] == pytest.approx(max(top.values()), abs=1e-5)

    stream = client.completions.create(model=model, prompt=PROMPT, max_tokens=4, echo=True, temperature=0,
                                       stream=True)
    assert "".join(c.choices[0].text for c in stream if c.choices) == greedy(client, model, PROMPT, echo=True,
                                                                           max_tokens=4)


def test_best_of_keeps_the_most_likely_samples(client: openai.OpenAI, model: str) -> None:
    sampled = client.completions.create(model=model, prompt=PROMPT, max_tokens=5, n=3, seed=7, temperature=1.0,
                                        logprobs=0)
    totals = {c.text: math.fsum(c.logprobs.token_logprobs) for c in sampled.choices}  # type: ignore[arg-type,union-attr]
    best = client.completions.create(model=model, prompt=PROMPT, max_tokens=5, n=1, best_of=3, seed=7,
                                     temperature=1.0)
    assert len(best.choices) == 1 and best.choices[0].logprobs is None
    assert best.choices[0].text == max(totals, key=totals.__getitem__)
    with pytest.raises(openai.BadRequestError, match="best_of"):
        client.completions.create(model=model, prompt=PROMPT, n=2, best_of=1)


def test_logit_bias_reaches_the_sampler(client: openai.OpenAI, model: str) -> None:
    forced = client.completions.create(model=model, prompt=PROMPT, max_tokens=4, temperature=0,
                                       logit_bias={"1234": 100})
    unbiased = greedy(client, model, PROMPT, max_tokens=4)
    assert forced.choices[0].text != unbiased
    assert forced.usage is not None and forced.usage.completion_tokens == 4
    ids = client.completions.create(model=model, prompt=PROMPT, max_tokens=4, temperature=0, logprobs=0,
                                    logit_bias={"1234": 100}).choices[0].logprobs
    assert ids is not None and len(set(ids.tokens or [])) == 1


def test_json_object_is_compact(client: openai.OpenAI, model: str) -> None:
    reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "JSON please"}],
                                           response_format={"type": "json_object"}, max_tokens=40, temperature=0)
    text = reply.choices[0].message.content or ""
    assert text.startswith("{")
    if reply.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)
    assert "\n" not in text and "  " not in text


@pytest.mark.parametrize(("url", "field", "value"), [
    ("completions", "suffix", "and then"),
    ("completions", "frobnicate", 1),
    ("chat", "functions", [{"name": "f"}]),
    ("chat", "audio", {"voice": "alloy"}),
    ("chat", "prediction", {"type": "content", "content": "x"}),
])
def test_fields_that_would_change_the_output_are_refused(server: Server, model: str, url: str, field: str,
                                                         value: object) -> None:
    client = server.client()
    with pytest.raises(openai.BadRequestError) as caught:
        if url == "chat":
            client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                           extra_body={field: value})
        else:
            client.completions.create(model=model, prompt="hi", max_tokens=2, extra_body={field: value})
    error = caught.value.body
    assert isinstance(error, dict) and error["param"] == field and error["code"] == "unsupported_parameter"


def test_bookkeeping_fields_are_accepted(client: openai.OpenAI, model: str) -> None:
    reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                           user="u-1", metadata={"a": "b"}, store=False, service_tier="auto")
    assert reply.choices[0].message.content is not None


def test_a_batch_line_with_a_prompt_list(tmp_path: Path, tiny_models: dict[str, Path], client: openai.OpenAI,
                                         model: str) -> None:
    body = {"prompt": [PROMPT, "Once upon a time"], "max_tokens": 6, "temperature": 0, "echo": True}
    path = write_jsonl(tmp_path / "in.jsonl", [{"custom_id": "a", "method": "POST", "url": COMPLETIONS_URL,
                                                "body": body}])
    run_cli(path, "-o", tmp_path / "out.jsonl", "--model", tiny_models["llama"], "--dtype", "float32")
    (record,) = read_jsonl(tmp_path / "out.jsonl")
    texts = [c["text"] for c in record["response"]["body"]["choices"]]
    assert texts == [p + greedy(client, model, p) for p in body["prompt"]]  # type: ignore[union-attr]


def test_the_models_generation_defaults_fill_what_a_request_leaves_out(tmp_path: Path,
                                                                       tiny_models: dict[str, Path]) -> None:
    folder = shutil.copytree(tiny_models["llama"], tmp_path / "model")
    config = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps({**config, "temperature": 0.25, "top_k": 5}))
    frontend = LLM(str(folder), dtype="float32", kv_cache_memory=1 << 26).frontend
    endpoint = ENDPOINTS[COMPLETIONS_URL]
    call = endpoint.parse({"prompt": "hi"})
    endpoint.prepare(frontend, call)
    assert (call.params.temperature, call.params.top_k) == (0.25, 5)  # type: ignore[union-attr]
    call = endpoint.parse({"prompt": "hi", "temperature": 0.9})
    endpoint.prepare(frontend, call)
    assert (call.params.temperature, call.params.top_k) == (0.9, 5)  # type: ignore[union-attr]
