"""Speculative decoding when the batch is small: prompt-lookup drafts, and how many to draft.

A decode step reads every weight once however few tokens it computes, so a thin batch (a job's tail)
leaves the machine mostly idle. A sequence can instead compute its next token and k drafted ones in
the same step, as a k + 1 token chunk, and keep the drafts its own sampler agrees with:
- Drafts come from prompt lookup (n-gram matching): the tokens that followed an earlier occurrence of
  the sequence's last n tokens (n = MAX_NGRAM down to MIN_NGRAM), in its prompt or output; of the
  MAX_NGRAM-gram's latest occurrences, the one whose match with the sequence's end runs furthest back.
  Free to compute, and strong where outputs copy spans of the input (extraction, rewriting).
- Verification needs no extra rule: each row of the chunk is sampled exactly as a plain decode of
  that position would be (same logits, as a row's result never depends on its batch; same per-token
  seed), and a draft is kept while it equals the sample; the first sample that differs is the
  step's last token. For a one-token draft this is the standard rejection rule (kept with
  probability p(draft), else a sample of p without it), so outputs keep their distribution, and
  greedy or seeded outputs are the very tokens decoding without speculation gives.
- How many: a step of T tokens costs the fastest of the last few decode steps measured at T (the
  minimum, as a machine shared with other work makes single steps slow at random; of as many steps
  for every T, so that a busy machine slows every count alike), interpolated between measured
  token counts; not a line: the first extra tokens of a step cost more than the next ones. Draft i
  is kept with probability a_i given drafts 1 .. i-1 were, measured per draft position and per
  class of the length of the match that found it (MATCH_CLASS_STARTS: a copied span tends to go on,
  so later drafts are kept more often than the first, not less; a 3-gram match is right far more
  often than a 1-gram one, on the extraction benchmark 65-69% of drafts against 11%; and a match of
  16 tokens or more, a line being copied, more often than one of 5). The chance that a sequence's
  draft i is kept is then c_i = a_1 ... a_i of its class. Each step, `draft_lengths` takes drafts in order of
  their chance (within a sequence that is position order: c_i falls with i) up to the total that
  maximises expected tokens per second; 0 once the batch is large enough that computing drafts
  costs more than they save. After PROBE_INTERVAL steps without drafts, the likeliest are verified
  anyway, so that drafts judged useless once are found useful again when a job's lines change.
"""

from __future__ import annotations

import math
from array import array
from bisect import bisect_left, bisect_right
from collections import deque
from itertools import accumulate, groupby
from operator import mul
from typing import NamedTuple

# Longer matches first: their drafts are kept more often (replaying the extraction benchmark at B=4, 3 -> 5 took
# 2.04x over no drafts to 2.30x).
MIN_NGRAM, MAX_NGRAM = 1, 5
# A draft's class, whose acceptance is its own: the length of the match that found it (its n-gram, extended back
# as far as the occurrence goes on matching, up to LONGEST_MATCH tokens), in classes starting at these lengths.
# NOTE: with one class for every match of 5 or more tokens, the drafts of a line being copied (kept ~97% of the
# time at every position) shared an acceptance with those of a 5-token match that happens to recur (first draft
# ~86%), and at B=4 few of either were worth verifying. Replaying the extraction benchmark's greedy outputs through
# this policy (24 requests; a step cost of 10 ms + 1 ms a token over 4), B=4 over no drafts: one class for n >= 5
# 1.38x, these classes 1.64x (with the latest occurrence's match only, not the longest of OCCURRENCES_COMPARED:
# 1.59x); B=1 3.36 -> 3.46x, B=2 2.49 -> 2.53x.
MATCH_CLASS_STARTS = (1, 2, 3, 4, 8, 16, 32)
LONGEST_MATCH = MATCH_CLASS_STARTS[-1]
OCCURRENCES_COMPARED = 16  # of the MAX_NGRAM-gram, latest first
MAX_DRAFT = 8
# Where no step was measured: a step of one token costs as much as this many more (weights read vs
# compute per token), scaled from the nearest measured token count.
PRIOR_TOKENS_PER_WEIGHT_READ = 8.0
# Steps measured at a token count before its fastest is trusted: the first steps of a new size are
# slow (buffers, kernel set-up), and one slow step must not put a draft length out of reach for good.
STEPS_TO_TRUST = 3
# A token count's cost is the fastest of its last STEPS_REMEMBERED steps (>= STEPS_TO_TRUST: a count is trusted once
# it holds that many): as many for every count, and recent.
# NOTE: the fastest of all steps ever measured compared a minimum over hundreds of plain decode steps with
# one over a few verification steps, so on a busy machine (where most steps are slowed at random) drafts
# looked dear and stopped for good: B=4 on the extraction benchmark at a load of ~5 drafted 63 tokens where a
# quiet run drafts ~1,500. A job's machine also gets busier or quieter as it runs.
STEPS_REMEMBERED = 8
# Each draft position's acceptance before it is judged, as PRIOR_WEIGHT observations: even odds for
# the first, optimistic for later ones (so long drafts get tried; a few verifications override it).
# ACCEPTANCE_MEMORY: how much of its past a position's count keeps per observation (a job's phases).
PRIOR_FIRST_ACCEPTANCE, PRIOR_LATER_ACCEPTANCE, PRIOR_WEIGHT, ACCEPTANCE_MEMORY = 0.5, 0.9, 2.0, 0.98
# Decode steps without any draft after which the likeliest drafts are verified anyway (where drafts at the
# prior's acceptance would pay): a probe, so that drafts judged useless are tried again when a job's lines
# change (nothing to copy in the first, much later), at a cost of one step's extra rows in this many.
PROBE_INTERVAL = 256


class Draft(NamedTuple):
    tokens: list[int]
    match_class: int  # of the length of the match that found them (1 .. len(MATCH_CLASS_STARTS)); 0: none found


def propose(token_ids: list[int], max_tokens: int) -> Draft:
    """Up to max_tokens drafts: what followed an earlier occurrence of the last n tokens (module docstring)."""
    if max_tokens <= 0 or len(token_ids) < MIN_NGRAM + 1:
        return Draft([], 0)
    haystack = array("i", token_ids).tobytes()
    for n in range(min(MAX_NGRAM, len(token_ids) - 1), MIN_NGRAM - 1, -1):
        needle = haystack[-4 * n:]
        end = len(haystack) - 4  # an occurrence must end before the last token
        compared, longest, start = 0, 0, 0
        while compared < (OCCURRENCES_COMPARED if n == MAX_NGRAM else 1) and \
                (found := haystack.rfind(needle, 0, end)) >= 0:
            end = found + 4 * n - 1  # the next one further back
            if found % 4:
                continue  # a match across token boundaries
            compared += 1
            length, before = n, found // 4 - 1  # how far back the occurrence goes on matching
            while length < LONGEST_MATCH and before >= 0 and token_ids[before] == token_ids[-1 - length]:
                length, before = length + 1, before - 1
            if length > longest:  # ties: the latest
                longest, start = length, found // 4 + n
        if compared:
            return Draft(token_ids[start:start + max_tokens], bisect_right(MATCH_CLASS_STARTS, longest))
    return Draft([], 0)


class DraftPolicy:
    """Chooses each step's draft lengths from measured step costs and acceptance (module docstring)."""

    def __init__(self) -> None:
        # Per match class c (index c - 1) and draft position i (0-based): decayed counts of verifications
        # reaching position i, and of the drafts kept there.
        classes = range(len(MATCH_CLASS_STARTS))
        self.reached = [[PRIOR_WEIGHT] * MAX_DRAFT for _ in classes]
        prior = [PRIOR_WEIGHT * (PRIOR_LATER_ACCEPTANCE if i else PRIOR_FIRST_ACCEPTANCE) for i in range(MAX_DRAFT)]
        self.kept = [list(prior) for _ in classes]
        self.prior_chances = list(accumulate((kept / PRIOR_WEIGHT for kept in prior), mul))
        self.steps_without_drafts = 0
        self.recent: dict[int, deque[float]] = {}  # tokens of a decode step -> its last steps' seconds
        self._knots: list[tuple[int, float]] | None = []  # the cost table step_cost reads; None: rebuild

    def observe_step(self, tokens: int, seconds: float) -> None:
        self.steps_without_drafts += 1
        self.recent.setdefault(tokens, deque(maxlen=STEPS_REMEMBERED)).append(seconds)
        self._knots = None

    def observe_drafts(self, match_class: int, drafted: int, accepted: int) -> None:
        """A sequence's k drafted tokens (of this match class) were verified, the first `accepted` kept."""
        self.steps_without_drafts = 0
        reached, kept = self.reached[match_class - 1], self.kept[match_class - 1]
        for i in range(min(drafted, accepted + 1)):  # positions judged with every draft before them kept
            reached[i] = ACCEPTANCE_MEMORY * reached[i] + 1
            kept[i] = ACCEPTANCE_MEMORY * kept[i] + (i < accepted)

    def acceptance(self, match_class: int, position: int) -> float:
        return self.kept[match_class - 1][position] / self.reached[match_class - 1][position]

    def chances(self, match_class: int) -> list[float]:
        """c_i for i = 1 .. MAX_DRAFT: the chance that draft i of this match class is kept."""
        return list(accumulate((self.acceptance(match_class, i) for i in range(MAX_DRAFT)), mul))

    def knots(self) -> list[tuple[int, float]]:
        """(tokens, seconds) per trusted token count, the fastest recent step there or at any larger count."""
        if self._knots is None:
            # NOTE: a larger step is never cheaper, and noise only slows steps: a fast step at T is
            # the better bound for every smaller count, so the table is monotone in T.
            cheapest, knots = math.inf, []
            for tokens in sorted((t for t, times in self.recent.items() if len(times) >= STEPS_TO_TRUST), reverse=True):
                cheapest = min(cheapest, *self.recent[tokens])
                knots.append((tokens, cheapest))
            self._knots = knots[::-1]
        return self._knots

    def step_cost(self, tokens: int) -> float:
        """A decode step's seconds for this many tokens (relative units before any step is measured)."""
        knots = self.knots()
        i = bisect_left(knots, (tokens,))
        if 0 < i < len(knots) and knots[i][0] != tokens:  # between two measured counts: interpolate
            (low, low_s), (high, high_s) = knots[i - 1], knots[i]
            return low_s + (high_s - low_s) * (tokens - low) / (high - low)
        nearest, seconds = knots[min(i, len(knots) - 1)] if knots else (0, PRIOR_TOKENS_PER_WEIGHT_READ)
        return seconds * (PRIOR_TOKENS_PER_WEIGHT_READ + tokens) / (PRIOR_TOKENS_PER_WEIGHT_READ + nearest)

    def may_draft(self, batch_size: int) -> bool:
        """Whether drafts could pay for batch_size sequences were MAX_DRAFT of them found for each in the
        match class kept most often (an upper bound on draft_lengths: checked before proposing, which
        costs time in large batches)."""
        best = max((self.chances(c) for c in range(1, len(MATCH_CLASS_STARTS) + 1)), key=sum)
        pays = self._best_total(batch_size, [(chance, batch_size) for chance in best]) > 0
        return pays or self._probe_due(batch_size)

    def _probe_due(self, batch_size: int) -> bool:
        return self.steps_without_drafts >= PROBE_INTERVAL and \
            self._best_total(batch_size, [(chance, batch_size) for chance in self.prior_chances]) > 0

    def draft_lengths(self, batch_size: int, drafts: list[Draft]) -> list[int]:
        """How many of its proposed drafts each sequence computes in a step of batch_size sequences."""
        chances = {c: self.chances(c) for c in {d.match_class for d in drafts if d.tokens}}
        # Every proposed draft with its chance of being kept, likeliest first (ties: lower positions,
        # then earlier sequences, so that a sequence's drafts are taken in position order).
        ranked = sorted(((chances[d.match_class][i], i, s) for s, d in enumerate(drafts)
                         for i in range(len(d.tokens))),
                        key=lambda item: (-item[0], item[1], item[2]))
        runs = [(chance, len(list(run))) for chance, run in groupby(chance for chance, _, _ in ranked)]
        total = self._best_total(batch_size, runs) or (MAX_DRAFT if self._probe_due(batch_size) else 0)
        lengths = [0] * len(drafts)
        for _, _, s in ranked[:total]:
            lengths[s] += 1
        return lengths

    def _best_total(self, batch_size: int, runs: list[tuple[float, int]]) -> int:
        """How many drafts, taken likeliest first, maximise expected tokens per second; `runs` are
        (chance of being kept, drafts with that chance), highest chance first."""
        if batch_size == 0 or not runs:
            return 0
        ends = list(accumulate(count for _, count in runs))
        gains = list(accumulate((chance * count for chance, count in runs), initial=0.0))  # of whole runs
        # NOTE: within a run and between measured token counts, expected tokens and step cost are both
        # linear in the total, so their ratio is monotone there: its best is at the end of a run or at
        # a measured count, and checking only those keeps this cheap at large batches.
        candidates = set(ends) | {t - batch_size for t, _ in self.knots() if 0 < t - batch_size < ends[-1]}
        best, best_rate = 0, batch_size / self.step_cost(batch_size)
        for total in sorted(candidates):
            run = bisect_left(ends, total)  # the run this total's last draft is in
            produced = batch_size + gains[run] + (total - (ends[run] - runs[run][1])) * runs[run][0]
            if (rate := produced / self.step_cost(batch_size + total)) > best_rate:
                best, best_rate = total, rate
        return best
