"""Turns one step's logits into tokens, for the whole batch at once.

Rows are sequences; every per-request setting becomes a column tensor, so the work is a handful of
tensor ops whatever the mix of settings. Only seeded requests cost a Python call each (one
generator draw per row), since a torch generator cannot be shared between rows.

The order, as vLLM's: logit_bias (added to the model's logits before anything else), then the masks
(allowed_token_ids, bad_words), penalties, min_tokens, temperature, top-k, top-p, min-p. Logprobs
are not taken here: the engine reports the raw model output's (see SamplingParams).

Contract: a row's token depends only on its own logits and settings, never on the other rows; a
seeded row's noise only on (seed, sample index, output position) (`Sequence.next_token_seed`), so
seeded outputs are the same alone, in any batch, after a preemption or in a resumed job.
"""

from __future__ import annotations

import torch

from tokenmill.engine.sequence import Sequence
from tokenmill.outputs import Logprob, TokenLogprobs


def _pad(rows: list[list[int]], fill: int, device: torch.device) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [fill] * (width - len(r)) for r in rows], dtype=torch.long, device=device)


def _row_index(lengths: list[int], device: torch.device) -> torch.Tensor:
    """For entries listed row after row, lengths[r] of them in row r: each entry's row."""
    return torch.arange(len(lengths), device=device).repeat_interleave(torch.tensor(lengths, device=device))


def apply_logit_bias(logits: torch.Tensor, seqs: list[Sequence]) -> None:
    rows = [(i, bias) for i, s in enumerate(seqs) if (bias := s.request.logit_bias) is not None]
    if not rows:
        return
    device = logits.device
    row_ids = torch.tensor([i for i, _ in rows], device=device)[_row_index([len(ids) for _, (ids, _) in rows], device)]
    token_ids = torch.cat([ids for _, (ids, _) in rows]).to(device)
    values = torch.cat([values for _, (_, values) in rows]).to(device)
    logits.index_put_((row_ids, token_ids), values, accumulate=True)


def apply_allowed_token_ids(logits: torch.Tensor, seqs: list[Sequence]) -> None:
    rows = [(i, ids) for i, s in enumerate(seqs) if (ids := s.request.allowed_token_ids) is not None]
    if not rows:
        return
    device = logits.device
    keep = torch.zeros(len(rows), logits.shape[1], dtype=torch.bool, device=device)
    keep[_row_index([len(ids) for _, ids in rows], device), torch.cat([ids for _, ids in rows]).to(device)] = True
    index = torch.tensor([i for i, _ in rows], device=device)
    logits[index] = logits[index].masked_fill_(~keep, float("-inf"))


def apply_bad_words(logits: torch.Tensor, seqs: list[Sequence]) -> None:
    """Bans each bad word's last token in the rows whose output so far ends with its other tokens."""
    banned = [(i, word[-1]) for i, s in enumerate(seqs) for word in s.request.bad_words_token_ids
              if s.num_output_tokens >= len(word) - 1
              and s.token_ids[s.num_tokens - len(word) + 1:] == word[:-1]]
    if banned:
        rows, token_ids = zip(*banned)
        logits[list(rows), list(token_ids)] = float("-inf")


def apply_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> None:
    rows = [i for i, s in enumerate(seqs) if s.params.repetition_penalty != 1.0
            or s.params.frequency_penalty != 0.0 or s.params.presence_penalty != 0.0]
    if not rows:
        return
    vocab, device = logits.shape[1], logits.device
    sub = logits[rows]
    params = [seqs[i].params for i in rows]
    # Padding points at an extra column that is dropped afterwards.
    outputs = _pad([seqs[i].output_token_ids for i in rows], vocab, device)
    counts = torch.zeros(len(rows), vocab + 1, device=device).scatter_add_(
        1, outputs, torch.ones_like(outputs, dtype=torch.float))
    counts = counts[:, :vocab]
    prompts = _pad([seqs[i].token_ids[:seqs[i].num_prompt_tokens] for i in rows], vocab, device)
    seen = torch.zeros(len(rows), vocab + 1, dtype=torch.bool, device=device).scatter_(1, prompts, True)[:, :vocab]
    seen |= counts > 0
    rep = torch.tensor([p.repetition_penalty for p in params], device=device)[:, None]
    sub = torch.where(seen, torch.where(sub > 0, sub / rep, sub * rep), sub)
    sub -= torch.tensor([p.frequency_penalty for p in params], device=device)[:, None] * counts
    sub -= torch.tensor([p.presence_penalty for p in params], device=device)[:, None] * (counts > 0)
    logits[rows] = sub


def _filter(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """top-k, top-p and min-p, on temperature-scaled logits; removed tokens get -inf."""
    top_k = [s.params.top_k for s in seqs]
    top_p = [s.params.top_p for s in seqs]
    min_p = [s.params.min_p for s in seqs]
    device = logits.device
    if any(k > 0 for k in top_k) or any(p < 1.0 for p in top_p):
        vocab = logits.shape[1]
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        ranks = torch.arange(vocab, device=device)[None, :]
        k = torch.tensor([k if k > 0 else vocab for k in top_k], device=device)[:, None]
        drop = ranks >= k
        probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
        # Drop a token once the tokens before it already cover top_p; the first always stays.
        drop |= (probs.cumsum(dim=-1) - probs) >= torch.tensor(top_p, device=device)[:, None]
        drop[:, 0] = False
        logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
    if any(p > 0 for p in min_p):
        probs = logits.softmax(dim=-1)
        threshold = probs.max(dim=-1, keepdim=True).values * torch.tensor(min_p, device=device)[:, None]
        logits = logits.masked_fill(probs < threshold, float("-inf"))
    return logits


# Vocabulary chunk of `first_argmax`: small enough for the second pass to be cheap, large enough
# for few chunk maxima.
_ARGMAX_CHUNK = 1024


def first_argmax(logits: torch.Tensor) -> torch.Tensor:
    """`logits.argmax(dim=-1)` for [R, V] logits, the same indices (the first maximum; NaN counts as
    the maximum) at a fraction of the time: torch's CPU argmax is a scalar loop (~0.85 ms for
    64 x 49152), amax is vectorized. The first chunk holding the row maximum is found from the
    chunks' maxima, then the index within that one chunk."""
    vocab = logits.shape[-1]
    if vocab < 4 * _ARGMAX_CHUNK:
        return logits.argmax(dim=-1)
    full = vocab // _ARGMAX_CHUNK * _ARGMAX_CHUNK
    chunk_max = logits[:, :full].unflatten(1, (-1, _ARGMAX_CHUNK)).amax(dim=-1)
    if full < vocab:
        chunk_max = torch.cat((chunk_max, logits[:, full:].amax(dim=-1, keepdim=True)), dim=1)
    start = chunk_max.argmax(dim=-1, keepdim=True) * _ARGMAX_CHUNK
    # A short last chunk repeats the final column: argmax's first occurrence ignores the repeats.
    window = (start + torch.arange(_ARGMAX_CHUNK, device=logits.device)).clamp_(max=vocab - 1)
    return window.gather(1, logits.gather(1, window).argmax(dim=-1, keepdim=True)).squeeze(1)


def sample(logits: torch.Tensor, seqs: list[Sequence], eos_token_ids: set[int],
           ahead: list[int] | None = None) -> torch.Tensor:
    """logits: [R, V] fp32, one row per sequence in seqs (edited in place). Returns the chosen token ids, [R].
    `ahead`: per row, how many tokens after the sequence's next one the row samples (a drafted
    position: engine/speculation.py; its sequence has no history-dependent settings)."""
    ahead = ahead or [0] * len(seqs)
    apply_logit_bias(logits, seqs)
    apply_allowed_token_ids(logits, seqs)
    apply_bad_words(logits, seqs)
    apply_penalties(logits, seqs)
    blocked = [(i, list(s.params.stop_token_ids) + ([] if s.params.ignore_eos else list(eos_token_ids)))
               for i, s in enumerate(seqs) if s.num_output_tokens + ahead[i] < s.params.min_tokens]
    for i, token_ids in blocked:
        logits[i, token_ids] = float("-inf")

    tokens = first_argmax(logits)
    random_rows = [i for i, s in enumerate(seqs) if not s.params.greedy]
    if not random_rows:
        return tokens
    rseqs = [seqs[i] for i in random_rows]
    temps = torch.tensor([s.params.temperature for s in rseqs], device=logits.device)[:, None]
    probs = _filter(logits[random_rows] / temps, rseqs).softmax(dim=-1)
    # Exponential race: argmax(p / E) with E ~ Exp(1) draws from p, and lets each seeded row
    # take its noise from a generator seeded for that very token.
    noise = torch.empty_like(probs).exponential_()
    generator = torch.Generator(logits.device)
    for row, (i, s) in enumerate(zip(random_rows, rseqs)):
        if (seed := s.next_token_seed(ahead[i])) is not None:
            noise[row].exponential_(generator=generator.manual_seed(seed))
    tokens[random_rows] = (probs / noise).argmax(dim=-1)
    return tokens


def top_logprobs(logprobs: torch.Tensor, chosen: torch.Tensor, num_top: list[int]) -> list[TokenLogprobs]:
    """logprobs: [R, V]; chosen: [R] token ids. Each row's top num_top[r] tokens plus the chosen one."""
    k = max(num_top)
    top_values, top_ids = logprobs.topk(k, dim=-1) if k else (logprobs[:, :0], chosen[:, None][:, :0])
    chosen_values = logprobs.gather(1, chosen[:, None]).squeeze(1)
    chosen_ranks = (logprobs > chosen_values[:, None]).sum(dim=-1) + 1
    result = []
    for row, (ids, values, n) in enumerate(zip(top_ids.tolist(), top_values.tolist(), num_top)):
        entry = {tid: Logprob(v, rank + 1) for rank, (tid, v) in enumerate(zip(ids[:n], values[:n]))}
        token = int(chosen[row])
        if token not in entry:
            entry[token] = Logprob(float(chosen_values[row]), int(chosen_ranks[row]))
        result.append(entry)
    return result
