"""The cost of structured output: one extraction workload with and without a JSON schema.

64 chat requests on the default model ask for a customer order as JSON; the constrained run adds
`response_format`-style schema constraints (xgrammar masks). Prints output tokens/s of both.

    .venv/bin/python benchmarks/bench_structured.py [--requests 64] [--dtype auto]
"""

from __future__ import annotations

import argparse
import random
import time

from tokenmill import LLM, SamplingParams, StructuredOutputsParams

SCHEMA = {
    "type": "object",
    "properties": {
        "customer": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 40},
                                                      "city": {"type": "string", "maxLength": 40}},
                     "required": ["name", "city"]},
        "items": {"type": "array", "minItems": 1, "maxItems": 3,
                  "items": {"type": "object", "properties": {
                      "product": {"enum": ["desk lamp", "kettle", "toaster", "office chair", "USB cable", "other"]},
                      "quantity": {"type": "integer", "minimum": 1, "maximum": 99}},
                      "required": ["product", "quantity"]}},
        "priority": {"enum": ["low", "normal", "urgent"]},
    },
    "required": ["customer", "items", "priority"],
}


def conversations(count: int) -> list[list[dict[str, str]]]:
    rng = random.Random(0)
    names, cities = ["Anna Schmidt", "Luis Garcia", "Mei Chen", "Tom Baker"], ["Berlin", "Madrid", "Leeds", "Milan"]
    products = ["desk lamp", "kettle", "toaster", "office chair", "USB cable"]
    return [[{"role": "system", "content": "Extract the order from the customer's message as JSON with the customer's "
                                           "name and city, the items with quantities, and the priority."},
             {"role": "user", "content": f"Hi, this is {rng.choice(names)} from {rng.choice(cities)}. Please send "
                                         f"{rng.randint(1, 9)} x {rng.choice(products)}."}] for _ in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()
    llm = LLM(dtype=args.dtype)
    convs = conversations(args.requests)
    llm.chat(convs[:2], SamplingParams(max_tokens=4), use_tqdm=False)  # warm-up
    print("| run | output tokens | seconds | output tok/s |\n|---|---:|---:|---:|")
    rates = {}
    for name, structured in (("free", None), ("json schema", StructuredOutputsParams(json=SCHEMA))):
        params = SamplingParams(temperature=0, max_tokens=96, structured_outputs=structured)
        start = time.perf_counter()
        outputs = llm.chat(convs, params, use_tqdm=False)
        seconds = time.perf_counter() - start
        tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
        rates[name] = tokens / seconds
        print(f"| {name} | {tokens} | {seconds:.1f} | {rates[name]:.0f} |")
    print(f"\nconstrained / free: {rates['json schema'] / rates['free']:.2f}")


if __name__ == "__main__":
    main()
