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
- How many: a step costs about `fixed + per_token x tokens` (weights read once, plus compute per
  token), fitted online from the engine's own decode steps. With acceptance rate a, k drafts yield
  (1 - a^(k+1)) / (1 - a) tokens per sequence; `draft_length` picks the k (0 .. MAX_DRAFT) that
  maximises tokens per second for the step's batch, so it is 0 once the batch is large enough
  that computing drafts costs more than it saves.
"""

from __future__ import annotations

from array import array

MIN_NGRAM, MAX_NGRAM = 1, 3
MAX_DRAFT = 8
# Until steps are measured: a step of one token costs as much as this many more (weights vs compute).
PRIOR_TOKENS_PER_WEIGHT_READ = 8.0
# The acceptance rate assumed before any draft is judged, and how fast the estimate follows new steps.
PRIOR_ACCEPTANCE, ACCEPTANCE_MEMORY = 0.5, 0.05


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
    """Chooses each step's draft length from measured step costs and acceptance (module docstring)."""

    def __init__(self) -> None:
        self.acceptance = PRIOR_ACCEPTANCE
        # Least-squares sums over decode steps: count, tokens, seconds, tokens^2, tokens x seconds.
        self._n = self._t = self._s = self._tt = self._ts = 0.0

    def observe_step(self, tokens: int, seconds: float) -> None:
        self._n += 1
        self._t += tokens
        self._s += seconds
        self._tt += tokens * tokens
        self._ts += tokens * seconds

    def observe_drafts(self, drafted: int, accepted: int) -> None:
        if drafted:
            rate = accepted / drafted
            self.acceptance += ACCEPTANCE_MEMORY * (rate - self.acceptance)

    def tokens_per_weight_read(self) -> float:
        """fixed / per_token of the fitted step cost: how many tokens cost one read of the weights."""
        spread = self._n * self._tt - self._t * self._t
        if self._n < 8 or spread <= 0:
            return PRIOR_TOKENS_PER_WEIGHT_READ
        per_token = (self._n * self._ts - self._t * self._s) / spread
        fixed = (self._s - per_token * self._t) / self._n
        if per_token <= 0:
            return float(MAX_DRAFT * 64)
        return max(0.0, fixed / per_token)

    def draft_length(self, batch_size: int) -> int:
        """The k maximising expected tokens per unit of step time for batch_size sequences drafting k each."""
        if batch_size == 0:
            return 0
        ratio = self.tokens_per_weight_read()
        a = min(self.acceptance, 0.99)

        def tokens_per_cost(k: int) -> float:
            produced = batch_size * (1 - a ** (k + 1)) / (1 - a)
            return produced / (ratio + batch_size * (k + 1))

        return max(range(MAX_DRAFT + 1), key=tokens_per_cost)
