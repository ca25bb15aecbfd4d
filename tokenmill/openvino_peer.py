"""OpenVINO GenAI as a peer of `tokenmill bench batched`, run as a script by another interpreter.

    OV_PYTHON tokenmill/openvino_peer.py < spec.json > timings.json

It imports only the standard library, numpy and `openvino_genai`, so that it runs in a venv of its own
(OpenVINO's packages are not tokenmill's dependencies). The spec (stdin, JSON): `model` (a folder that
`optimum-cli export openvino` wrote), `threads`, `cache_gb` (the KV cache's size), `max_num_seqs`,
`max_num_batched_tokens`, `warmup` (one prompt's token ids, run as 2 requests before anything is timed;
null: no warm-up), `ttft` (prompts, one request each, in turn) and `grid` (a list of {pp, tg, b, prompts}).
It prints one JSON object: `load_s` (the ContinuousBatchingPipeline's construction: model read and
compiled, tokenizer models loaded), `ttft_s` (one per `ttft` prompt) and `rows` (one {pp, tg, b, t_pp,
t_tg} per grid point, in order).

A point is measured as llama-batched-bench measures: the B requests (token ids, greedy, EOS ignored,
TG + 1 new tokens) are added together and the pipeline is stepped by hand. Its scheduler runs in vLLM's
mode (no dynamic split-fuse; `max_num_batched_tokens` >= B * PP, so every prompt goes in one step), so
every prompt is processed before any sequence decodes: T_PP is the time until every request has its first
token, T_TG that of the TG steps after it, each of which must give every request one token (else the
point is refused as not lockstep). TTFT is one request's T_PP after the warm-up. Prefix caching is on, as
in tokenmill; B requests that share a prompt (`--pps`) are all added at once, and OpenVINO computes that
prompt as it chooses to.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import numpy as np
import openvino as ov
import openvino_genai as ov_genai


def greedy(new_tokens: int) -> ov_genai.GenerationConfig:
    config = ov_genai.GenerationConfig()
    config.do_sample = False
    config.max_new_tokens = config.min_new_tokens = new_tokens
    config.ignore_eos = True
    return config


class Peer:
    def __init__(self, spec: dict[str, Any]) -> None:
        scheduler = ov_genai.SchedulerConfig()
        scheduler.cache_size = spec["cache_gb"]
        scheduler.max_num_seqs = spec["max_num_seqs"]
        scheduler.max_num_batched_tokens = spec["max_num_batched_tokens"]
        scheduler.dynamic_split_fuse = False
        scheduler.enable_prefix_caching = True
        self.pipeline = ov_genai.ContinuousBatchingPipeline(spec["model"], scheduler, "CPU",
                                                            {"INFERENCE_NUM_THREADS": spec["threads"]})
        self.next_id = 0

    def add(self, prompts: list[list[int]], new_tokens: int) -> list[Any]:
        handles = []
        for prompt in prompts:
            ids = ov.Tensor(np.array([prompt], dtype=np.int64))
            handles.append(self.pipeline.add_request(self.next_id, ids, greedy(new_tokens)))
            self.next_id += 1
        return handles

    def step(self, handles: list[Any]) -> list[int]:
        """One scheduler step; returns how many tokens each request got from it."""
        self.pipeline.step()
        return [sum(len(out.generated_ids) for out in h.read().values()) if h.can_read() else 0 for h in handles]

    def point(self, prompts: list[list[int]], tg: int) -> tuple[float, float]:
        """T_PP and T_TG of B requests in lockstep."""
        handles = self.add(prompts, tg + 1)
        start = time.perf_counter()
        have_first = [0] * len(handles)
        while not all(have_first):
            have_first = [a + b for a, b in zip(have_first, self.step(handles))]
        t_pp = time.perf_counter() - start
        if any(n != 1 for n in have_first):
            raise RuntimeError("a request decoded before every prompt was processed")
        for _ in range(tg):
            if any(n != 1 for n in self.step(handles)):
                raise RuntimeError("the requests did not decode in lockstep (preempted: raise cache_gb)")
        t_tg = time.perf_counter() - start - t_pp
        if self.pipeline.has_non_finished_requests():
            raise RuntimeError("requests left unfinished after TG steps")
        return t_pp, t_tg


def main() -> None:
    spec = json.load(sys.stdin)
    start = time.perf_counter()
    peer = Peer(spec)
    result: dict[str, Any] = {"load_s": time.perf_counter() - start}
    if spec["warmup"] is not None:
        peer.point([spec["warmup"]] * 2, 4)
    result["ttft_s"] = [peer.point([prompt], 0)[0] for prompt in spec["ttft"]]
    result["rows"] = []
    for p in spec["grid"]:
        t_pp, t_tg = peer.point(p["prompts"], p["tg"])
        result["rows"].append({"pp": p["pp"], "tg": p["tg"], "b": p["b"], "t_pp": t_pp, "t_tg": t_tg})
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
