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
  token), fitted online on the fastest decode step seen at each token count (the minimum, as a
  machine shared with other work makes single steps slow at random). Draft i is kept with probability a_i
  given drafts 1 .. i-1 were (measured per position: a copied span tends to go on, so later drafts
  are kept more often than the first, not less), so k drafts yield 1 + a_1 + a_1 a_2 + ... tokens
  per sequence; `draft_length` picks the k (0 .. MAX_DRAFT) that maximises tokens per second for
  the step's batch, so it is 0 once the batch is large enough that computing drafts costs more
  than it saves.
"""

from __future__ import annotations

from array import array

MIN_NGRAM, MAX_NGRAM = 1, 3
MAX_DRAFT = 8
# Until steps of token counts this far apart are measured: a step of one token costs as much as
# this many more (weights vs compute).
PRIOR_TOKENS_PER_WEIGHT_READ, MIN_TOKEN_SPREAD = 8.0, 4
# The acceptance rate of a draft position before it is judged (as PRIOR_WEIGHT observations), and
# how much of its past each position's count keeps per new observation (to follow a job's phases).
PRIOR_ACCEPTANCE, PRIOR_WEIGHT, ACCEPTANCE_MEMORY = 0.5, 4.0, 0.98


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
        # Per draft position i (0-based): decayed counts of verifications reaching it, and of kept ones.
        self.reached = [PRIOR_WEIGHT] * MAX_DRAFT
        self.kept = [PRIOR_WEIGHT * PRIOR_ACCEPTANCE] * MAX_DRAFT
        self.fastest: dict[int, float] = {}  # tokens of a decode step -> its fastest time, seconds

    def observe_step(self, tokens: int, seconds: float) -> None:
        self.fastest[tokens] = min(seconds, self.fastest.get(tokens, seconds))

    def observe_drafts(self, drafted: int, accepted: int) -> None:
        """A sequence's k drafted tokens were verified, the first `accepted` kept."""
        for i in range(min(drafted, accepted + 1)):  # positions judged with every draft before them kept
            self.reached[i] = ACCEPTANCE_MEMORY * self.reached[i] + 1
            self.kept[i] = ACCEPTANCE_MEMORY * self.kept[i] + (i < accepted)

    def acceptance(self, position: int) -> float:
        return self.kept[position] / self.reached[position]

    def tokens_per_weight_read(self) -> float:
        """fixed / per_token of the fitted step cost: how many tokens cost one read of the weights."""
        if len(self.fastest) < 2 or max(self.fastest) - min(self.fastest) < MIN_TOKEN_SPREAD:
            return PRIOR_TOKENS_PER_WEIGHT_READ
        n = len(self.fastest)
        mean_t, mean_s = sum(self.fastest) / n, sum(self.fastest.values()) / n
        per_token = sum((t - mean_t) * (s - mean_s) for t, s in self.fastest.items()) / \
            sum((t - mean_t) ** 2 for t in self.fastest)
        if per_token <= 0:  # no cost per token measurable: every step is a read of the weights
            return float(MAX_DRAFT * 64)
        return max(0.0, (mean_s - per_token * mean_t) / per_token)

    def draft_length(self, batch_size: int) -> int:
        """The k maximising expected tokens per unit of step time for batch_size sequences drafting k each."""
        if batch_size == 0:
            return 0
        ratio = self.tokens_per_weight_read()
        best, best_rate, produced, chance = 0, 1 / (ratio + batch_size), 1.0, 1.0
        for k in range(1, MAX_DRAFT + 1):
            chance *= self.acceptance(k - 1)  # that draft k is reached and kept
            produced += chance
            if (rate := produced / (ratio + batch_size * (k + 1))) > best_rate:
                best, best_rate = k, rate
        return best
