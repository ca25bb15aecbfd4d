"""Speculative decoding when the batch is small: prompt-lookup drafts, and how many to draft.

A decode step reads every weight once however few tokens it computes, so a thin batch (a job's tail)
leaves the machine mostly idle. A sequence can instead compute its next token and k drafted ones in
the same step, as a k + 1 token chunk, and keep the drafts its own sampler agrees with:
- Drafts come from prompt lookup (n-gram matching): the tokens that followed the latest earlier
  occurrence of the sequence's last n tokens (n = MAX_NGRAM down to MIN_NGRAM), in its prompt or
  output. Free to compute, and strong where outputs copy spans of the input (extraction, rewriting).
- Verification needs no extra rule: each row of the chunk is sampled exactly as a plain decode of
  that position would be (same logits, as a row's result never depends on its batch; same per-token
  seed), and a draft is kept while it equals the sample; the first sample that differs is the
  step's last token. For a one-token draft this is the standard rejection rule (kept with
  probability p(draft), else a sample of p without it), so outputs keep their distribution, and
  greedy or seeded outputs are the very tokens decoding without speculation gives.
- How many: a step of T tokens costs the fastest decode step measured at T (the minimum, as a
  machine shared with other work makes single steps slow at random), interpolated between measured
  token counts; not a line: the first extra tokens of a step cost more than the next ones. Draft i
  is kept with probability a_i given drafts 1 .. i-1 were (measured per position: a copied span
  tends to go on, so later drafts are kept more often than the first, not less), so the chance
  that a sequence's draft i is kept is c_i = a_1 ... a_i, the same for every sequence. Each step,
  `draft_lengths` takes the drafts position by position (every sequence's first before any
  second: c_i falls with i) up to the total that maximises expected tokens per second; 0 once the
  batch is large enough that computing drafts costs more than they save.
"""

from __future__ import annotations

import math
from array import array
from bisect import bisect_left, bisect_right
from itertools import accumulate
from operator import mul

MIN_NGRAM, MAX_NGRAM = 1, 3
MAX_DRAFT = 8
# Where no step was measured: a step of one token costs as much as this many more (weights read vs
# compute per token), scaled from the nearest measured token count.
PRIOR_TOKENS_PER_WEIGHT_READ = 8.0
# Steps measured at a token count before its fastest is trusted: the first steps of a new size are
# slow (buffers, kernel set-up), and one slow step must not put a draft length out of reach for good.
STEPS_TO_TRUST = 3
# Each draft position's acceptance before it is judged, as PRIOR_WEIGHT observations: even odds for
# the first, optimistic for later ones (so long drafts get tried; a few verifications override it).
# ACCEPTANCE_MEMORY: how much of its past a position's count keeps per observation (a job's phases).
PRIOR_FIRST_ACCEPTANCE, PRIOR_LATER_ACCEPTANCE, PRIOR_WEIGHT, ACCEPTANCE_MEMORY = 0.5, 0.9, 2.0, 0.98


def propose(token_ids: list[int], max_tokens: int) -> list[int]:
    """Up to max_tokens drafts: what followed the latest earlier occurrence of the last n tokens."""
    if max_tokens <= 0 or len(token_ids) < MIN_NGRAM + 1:
        return []
    haystack = array("i", token_ids).tobytes()
    for n in range(min(MAX_NGRAM, len(token_ids) - 1), MIN_NGRAM - 1, -1):
        needle = haystack[-4 * n:]
        end = len(haystack) - 4  # an occurrence must end before the last token
        while (found := haystack.rfind(needle, 0, end)) >= 0:
            if found % 4 == 0:
                start = found // 4 + n
                return token_ids[start:start + max_tokens]
            end = found + 4 * n - 1  # a match across token boundaries: look further back
    return []


class DraftPolicy:
    """Chooses each step's draft lengths from measured step costs and acceptance (module docstring)."""

    def __init__(self) -> None:
        # Per draft position i (0-based): decayed counts of verifications reaching it, and of kept ones.
        self.reached = [PRIOR_WEIGHT] * MAX_DRAFT
        self.kept = [PRIOR_WEIGHT * (PRIOR_LATER_ACCEPTANCE if i else PRIOR_FIRST_ACCEPTANCE) for i in range(MAX_DRAFT)]
        self.fastest: dict[int, float] = {}  # tokens of a decode step -> its fastest time, seconds
        self.measured: dict[int, int] = {}  # tokens of a decode step -> steps timed
        self._knots: list[tuple[int, float]] | None = []  # the cost table step_cost reads; None: rebuild

    def observe_step(self, tokens: int, seconds: float) -> None:
        self.measured[tokens] = self.measured.get(tokens, 0) + 1
        if seconds < self.fastest.get(tokens, math.inf) or self.measured[tokens] == STEPS_TO_TRUST:
            self.fastest[tokens] = min(seconds, self.fastest.get(tokens, seconds))
            self._knots = None

    def observe_drafts(self, drafted: int, accepted: int) -> None:
        """A sequence's k drafted tokens were verified, the first `accepted` kept."""
        for i in range(min(drafted, accepted + 1)):  # positions judged with every draft before them kept
            self.reached[i] = ACCEPTANCE_MEMORY * self.reached[i] + 1
            self.kept[i] = ACCEPTANCE_MEMORY * self.kept[i] + (i < accepted)

    def acceptance(self, position: int) -> float:
        return self.kept[position] / self.reached[position]

    def knots(self) -> list[tuple[int, float]]:
        """(tokens, seconds) per trusted token count, the fastest step there or at any larger count."""
        if self._knots is None:
            # NOTE: a larger step is never cheaper, and noise only slows steps: a fast step at T is
            # the better bound for every smaller count, so the table is monotone in T.
            cheapest, knots = math.inf, []
            for tokens in sorted((t for t, n in self.measured.items() if n >= STEPS_TO_TRUST), reverse=True):
                cheapest = min(cheapest, self.fastest[tokens])
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
        """Whether drafts could pay for batch_size sequences were MAX_DRAFT of them found for each (an
        upper bound on draft_lengths: checked before proposing, which costs time in large batches)."""
        return self._best_total(batch_size, [batch_size] * MAX_DRAFT) > 0

    def draft_lengths(self, batch_size: int, available: list[int]) -> list[int]:
        """How many of its `available` drafts each sequence computes in a step of batch_size sequences."""
        reaching = [sum(a > i for a in available) for i in range(MAX_DRAFT)]  # sequences with an (i+1)th
        total = self._best_total(batch_size, reaching)
        ends = list(accumulate(reaching))
        full = bisect_right(ends, total)  # positions every sequence with drafts there fills
        remainder = total - (ends[full - 1] if full else 0)  # given to the first sequences reaching the next one
        lengths = []
        for a in available:
            extra = a > full and remainder > 0
            remainder -= extra
            lengths.append(min(a, full) + extra)
        return lengths

    def _best_total(self, batch_size: int, reaching: list[int]) -> int:
        """The number of drafts, taken position by position, maximising expected tokens per second."""
        if batch_size == 0:
            return 0
        chances = list(accumulate((self.acceptance(i) for i in range(MAX_DRAFT)), mul))  # c_i
        gains = list(accumulate((n * c for n, c in zip(reaching, chances)), initial=0.0))  # of whole positions
        ends = list(accumulate(reaching))
        # NOTE: between a position's ends and between measured token counts, expected tokens and step
        # cost are both linear in the total, so their ratio is monotone there: its best is at one of
        # those points, and checking only them keeps this cheap at large batches.
        candidates = set(ends) | {t - batch_size for t, _ in self.knots() if 0 < t - batch_size < ends[-1]}
        best, best_rate = 0, batch_size / self.step_cost(batch_size)
        for total in sorted(candidates):
            position = bisect_left(ends, total)  # the position this total's last draft is at
            start = ends[position] - reaching[position]
            produced = batch_size + gains[position] + (total - start) * chances[position]
            if (rate := produced / self.step_cost(batch_size + total)) > best_rate:
                best, best_rate = total, rate
        return best
