"""The Python API on the default model (SmolLM2-135M-Instruct): classify support tickets that share
one instruction. Run with `.venv/bin/python examples/demo.py`."""

from __future__ import annotations

import time

from tokenmill import LLM, SamplingParams

INSTRUCTION = (
    "You are a support-ticket triage assistant. Read the customer's message and answer with exactly "
    "one category from this list: billing, shipping, technical, account, other. Answer with the "
    "category only, in lower case, with no explanation."
)
TICKETS = [
    "I was charged twice for my subscription this month.",
    "My parcel has been stuck in transit for ten days.",
    "The app crashes every time I open the settings page.",
    "How do I change the email address on my account?",
    "Do you have a store in Lisbon?",
    "The refund for my returned order has not arrived yet.",
    "I can't log in since I reset my password.",
    "The tracking number you sent me does not work.",
    "After the last update the sync button does nothing.",
    "Please delete my account and all my data.",
    "Can I pay with a bank transfer instead of a card?",
    "The delivery driver left the package at the wrong address.",
]


def main() -> None:
    llm = LLM()
    conversations = [[{"role": "system", "content": INSTRUCTION}, {"role": "user", "content": t}] for t in TICKETS]
    start = time.perf_counter()
    outputs = llm.chat(conversations, SamplingParams(temperature=0, max_tokens=8))
    elapsed = time.perf_counter() - start
    for ticket, output in zip(TICKETS, outputs):
        print(f"{output.outputs[0].text.strip()!r:>14}  <-  {ticket}")
    generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    stats = llm.engine.stats
    print(f"\n{len(outputs)} requests in {elapsed:.1f} s, {generated / elapsed:.0f} output tok/s, "
          f"prefix-cache hit rate {stats.prefix_cache_hit_rate:.0%}")


if __name__ == "__main__":
    main()
