"""Structured output: JSON schema, choice and errors, on the real model and in batch files."""

from __future__ import annotations

import json
import random
from pathlib import Path

import jsonschema
import pytest

from tokenmill import LLM, SamplingParams, StructuredOutputsParams
from tokenmill.batch.runner import BatchJob
from tokenmill.engine.client import LocalClient

ORDER_SCHEMA = {
    "type": "object",
    "properties": {
        "customer": {"type": "object",
                     "properties": {"name": {"type": "string", "maxLength": 40},
                                    "city": {"type": "string", "maxLength": 40}},
                     "required": ["name", "city"]},
        "items": {"type": "array", "minItems": 1, "maxItems": 3,
                  "items": {"type": "object",
                            "properties": {"product": {"enum": ["desk lamp", "kettle", "toaster", "office chair",
                                                                "USB cable", "other"]},
                                           "quantity": {"type": "integer", "minimum": 1, "maximum": 99}},
                            "required": ["product", "quantity"]}},
        "total": {"type": "integer", "minimum": 0, "maximum": 100000},
        "priority": {"enum": ["low", "normal", "urgent"]},
    },
    "required": ["customer", "items", "total", "priority"],
}
NAMES = ["Anna Schmidt", "Luis Garcia", "Mei Chen", "Tom Baker", "Sara Rossi"]
CITIES = ["Berlin", "Madrid", "Shanghai", "Leeds", "Milan"]
PRODUCTS = ["desk lamp", "kettle", "toaster", "office chair", "USB cable"]


def extraction_lines(count: int) -> list[dict]:
    rng = random.Random(3)
    lines = []
    for i in range(count):
        qty, product, price = rng.randint(1, 9), rng.choice(PRODUCTS), rng.randint(5, 200)
        message = (f"Hi, this is {rng.choice(NAMES)} from {rng.choice(CITIES)}. Please send {qty} x {product} "
                   f"at {price} euros each{', it is urgent' if i % 3 == 0 else ''}.")
        lines.append({"custom_id": f"order-{i}", "method": "POST", "url": "/v1/chat/completions", "body": {
            "max_tokens": 200, "temperature": 0,
            "messages": [{"role": "system", "content": "Extract the order from the customer's message as JSON."},
                         {"role": "user", "content": message}],
            "response_format": {"type": "json_schema",
                                "json_schema": {"name": "order", "schema": ORDER_SCHEMA, "strict": True}}}})
    return lines


def test_extraction_job_always_parses_and_validates(tmp_path: Path, smol_llm: LLM) -> None:
    lines = extraction_lines(50)
    input_path = tmp_path / "orders.jsonl"
    input_path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    summary = BatchJob(LocalClient(smol_llm.engine), input_path, tmp_path / "out.jsonl", use_tqdm=False).run()
    assert summary.succeeded == 50 and summary.failed == 0
    for record in map(json.loads, (tmp_path / "out.jsonl").read_text().splitlines()):
        choice = record["response"]["body"]["choices"][0]
        assert choice["finish_reason"] == "stop"
        jsonschema.validate(json.loads(choice["message"]["content"]), ORDER_SCHEMA)


def test_choice_gives_only_the_allowed_labels(smol_llm: LLM) -> None:
    labels = ["billing", "shipping", "technical"]
    tickets = ["I was charged twice.", "My parcel is late.", "The app crashes on start.", "Refund please.",
               "Where is my package?", "Login button does nothing."]
    params = SamplingParams(temperature=0.8, seed=1, max_tokens=8, structured_outputs=StructuredOutputsParams(
        choice=labels))
    outputs = smol_llm.chat([[{"role": "user", "content": f"Classify this ticket: {t}"}] for t in tickets], params,
                            use_tqdm=False)
    assert all(o.outputs[0].text in labels and o.outputs[0].finish_reason == "stop" for o in outputs)


def test_constrained_and_free_requests_share_a_batch(smol_llm: LLM) -> None:
    free = SamplingParams(temperature=0, max_tokens=16)
    regex = SamplingParams(temperature=0, max_tokens=16, structured_outputs=StructuredOutputsParams(regex=r"[0-9]{3}"))
    prompts = ["Write a number:", "Tell me a joke."]
    alone = smol_llm.generate(prompts[1:], free, use_tqdm=False)[0].outputs[0].token_ids
    mixed = smol_llm.generate(prompts, [regex, free], use_tqdm=False)
    assert len(mixed[0].outputs[0].text) == 3 and mixed[0].outputs[0].text.isdigit()
    assert mixed[1].outputs[0].token_ids == alone


def test_bad_schema_fails_alone_and_length_cut_is_reported(smol_llm: LLM) -> None:
    outputs = smol_llm.generate(
        ["a", "b", "c"],
        [SamplingParams(structured_outputs=StructuredOutputsParams(json="{not json")),
         SamplingParams(temperature=0, max_tokens=3, structured_outputs=StructuredOutputsParams(json=ORDER_SCHEMA)),
         SamplingParams(temperature=0, max_tokens=3)], use_tqdm=False)
    assert outputs[0].error.message.startswith("structured output: cannot compile json")
    assert outputs[0].error.param == "response_format"
    assert outputs[1].outputs[0].finish_reason == "length" and outputs[1].outputs[0].text.startswith("{")
    assert outputs[2].error is None
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputsParams(json=ORDER_SCHEMA, regex="a+")


def test_bad_schema_in_a_batch_file_is_an_error_line(tmp_path: Path, smol_llm: LLM) -> None:
    good, bad = extraction_lines(2)
    bad["body"]["response_format"]["json_schema"]["schema"] = {"type": "object", "properties": {"a": {"type": "x"}}}
    input_path = tmp_path / "in.jsonl"
    input_path.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    summary = BatchJob(LocalClient(smol_llm.engine), input_path, tmp_path / "out.jsonl", use_tqdm=False).run()
    assert (summary.succeeded, summary.failed) == (1, 1)
    error = json.loads((tmp_path / "out.errors.jsonl").read_text())["error"]
    assert error["code"] == "invalid_value" and error["message"].startswith("line 2: structured output: cannot")
