"""What one engine step costs on this machine: the step's work, and a linear model of its seconds.

A step's work (`StepWork`) is read off the `ScheduledBatch` the scheduler hands the engine, before
the step runs: the tokens it computes (every linear layer's rows), the rows that get logits (the
lm_head, sampling, detokenizing), of those the rows sampled at random (a softmax and a noise draw
over the vocabulary: ~4x a greedy row's cost here) and the seeded ones (a generator call and a
second draw each), its attention in two parts: the (query, key) pairs of its prompt chunks
(compute: a chunk's keys are read once for all its queries) and the keys its decodes read (memory:
each decode reads its whole context, but a prefix shared by all of the step's decodes is read once,
`shared_prefix_len`, as the attention backends do), and the sequences in it (per-sequence Python
and kernel set-up). `CostModel` is a non-negative least-squares fit of
measured step times on those features plus a constant (the weights read once per step, the step's
fixed Python); the planner prices simulated steps with it. Other per-row sampling work (top-k/p
sorting, penalties, logprobs, grammars) is priced as the fit finds it in the job's own sample.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from tokenmill.attention.torch_backend import shared_prefix_len
from tokenmill.engine.scheduler import ScheduledBatch
from tokenmill.engine.sequence import Sequence


@dataclass(frozen=True)
class StepWork:
    tokens: int  # computed this step: prompt chunks and decodes
    logit_rows: int  # rows whose logits are computed: sampled tokens, prompt logprobs
    random_rows: int  # of the sampled tokens, those drawn at random (temperature > 0)
    seeded_rows: int  # of those, the seeded ones
    chunk_pairs: int  # (query, key) pairs of prompt chunks (more than one new token)
    decode_reads: int  # keys read by decodes (one new token), a prefix they all share counted once
    seqs: int

    def features(self) -> list[float]:
        return [1.0, self.tokens, self.logit_rows, self.random_rows, self.seeded_rows, self.chunk_pairs,
                self.decode_reads, self.seqs]


@dataclass
class StepPlan:
    """A scheduled batch read before it runs: its work, and which sequences end their step with a
    new token or with their prompt computed (max_tokens 0), as the model runner decides."""

    work: StepWork
    sampled: list[Sequence]
    computed_prompts: list[Sequence]


def read_batch(batch: ScheduledBatch, block_size: int) -> StepPlan:
    """The batch's work; to be called before the step advances its sequences."""
    # NOTE: mirrors ModelRunner.run's choice of logits rows, so that a simulated step prices the
    # lm_head as the real one computes it.
    tokens = logit_rows = random_rows = seeded_rows = chunk_pairs = 0
    sampled: list[Sequence] = []
    computed_prompts: list[Sequence] = []
    decodes: list[Sequence] = []
    for seq, n in zip(batch.seqs, batch.num_new_tokens):
        done = seq.num_computed_tokens
        tokens += n
        if n == 1:
            decodes.append(seq)
        else:
            chunk_pairs += n * done + n * (n + 1) // 2
        if seq.request.prompt_logprobs is not None and seq.index == 0 and done < seq.num_prompt_tokens - 1:
            logit_rows += min(done + n, seq.num_prompt_tokens - 1) - done
        if done + n == seq.num_tokens:
            if seq.params.max_tokens == 0:
                computed_prompts.append(seq)
            else:
                sampled.append(seq)
                logit_rows += 1
                random_rows += not seq.params.greedy
                seeded_rows += not seq.params.greedy and seq.params.seed is not None
    work = StepWork(tokens, logit_rows, random_rows, seeded_rows, chunk_pairs, _decode_reads(decodes, block_size),
                    len(batch.seqs))
    return StepPlan(work, sampled, computed_prompts)


def _decode_reads(decodes: list[Sequence], block_size: int) -> int:
    """The keys the decodes read: each its context, up to and with its new token, the prefix they
    all share in the same blocks (found by the attention backends' own function) once."""
    if not decodes:
        return 0
    contexts = [seq.num_computed_tokens + 1 for seq in decodes]
    width = max(len(seq.block_table) for seq in decodes)
    table = torch.tensor([seq.block_table + [0] * (width - len(seq.block_table)) for seq in decodes])
    shared = shared_prefix_len(table, torch.tensor(contexts), block_size)
    return sum(contexts) - (len(decodes) - 1) * shared


@dataclass(frozen=True)
class CostModel:
    """Seconds of a step = coefficients . StepWork.features(), every coefficient >= 0."""

    coefficients: tuple[float, ...]

    def seconds(self, work: StepWork) -> float:
        return float(np.dot(self.coefficients, work.features()))

    @classmethod
    def fit(cls, steps: list[tuple[StepWork, float]]) -> CostModel:
        """The least-squares fit of `steps` (work, measured seconds) with no negative coefficient:
        a feature whose coefficient comes out negative (collinear with others over these steps) is
        dropped and the rest refitted, until none is."""
        x = np.array([w.features() for w, _ in steps], dtype=float)
        y = np.array([s for _, s in steps], dtype=float)
        # NOTE: scaled to unit columns first, so that attention pairs (~10^5) and the constant (1)
        # weigh alike in the solver.
        scale = np.maximum(np.abs(x).max(axis=0), 1e-12)
        active = list(range(x.shape[1]))
        while True:
            solution, *_ = np.linalg.lstsq(x[:, active] / scale[active], y, rcond=None)
            if (solution >= 0).all() or len(active) == 1:
                break
            del active[int(np.argmin(solution))]
        coefficients = np.zeros(x.shape[1])
        coefficients[active] = np.maximum(solution, 0) / scale[active]
        return cls(tuple(float(c) for c in coefficients))

    def prompt_tokens_per_s(self, step_tokens: int) -> float:
        """One sequence's prompt, computed `step_tokens` a step (its first chunk, from position 0)."""
        return step_tokens / self.seconds(StepWork(step_tokens, 0, 0, 0, step_tokens * (step_tokens + 1) // 2, 0, 1))

    def decode_tokens_per_s(self, batch: int, context: int) -> float:
        """`batch` sequences decoding greedily together, each with `context` tokens behind it of its own."""
        return batch / self.seconds(StepWork(batch, batch, 0, 0, 0, batch * (context + 1), batch))
