"""Output lengths a batch job's waiting lines are predicted to reach, for length-aware admission.

A job's wall time is set by its end: when the input runs out, the batch thins to the requests with
the longest outputs, and the machine decodes a few sequences at a time until they finish. Admitting
the long ones first (longest-processing-time-first, the classic makespan rule; S^3 predicts the
lengths) leaves short ones for the end, which finish together. The predictor is model-free: a
line's `max_tokens` (the context's room without one), lowered to the mean output of the finished
requests of its prefix group (lines whose prompts start alike: in real files, one task, one
system prompt, one length profile) once MIN_FINISHED of them have finished.

Lengths are compared in powers of two (`length_class`), so lines of one group and similar lengths
keep their prefix order, and their shared blocks stay cached while they run.
"""

from __future__ import annotations

from collections import OrderedDict

# Leading prompt tokens that name a line's group: a chat template's header and the start of the system prompt.
GROUP_TOKENS = 32
# Finished requests of a group before their mean replaces max_tokens.
MIN_FINISHED = 4
# Groups remembered, the most recently finished: a job in prefix order meets its groups one after
# another, so memory stays bounded on a file of 10^7 distinct prompts and nothing useful is lost.
MAX_GROUPS = 1 << 16


class LengthPredictor:
    def __init__(self, context_tokens: int) -> None:
        self.context_tokens = context_tokens
        self.finished: OrderedDict[tuple[int, ...], list[int]] = OrderedDict()  # group: [count, sum]
        self.version = 0  # changes whenever a group's predicted class may have changed

    @staticmethod
    def group(prompt: list[int]) -> tuple[int, ...]:
        return tuple(prompt[:GROUP_TOKENS])

    def predict(self, prompt: list[int], max_tokens: int | None) -> int:
        limit = self.context_tokens - len(prompt) if max_tokens is None else max_tokens
        count, total = self.finished.get(self.group(prompt), (0, 0))
        return min(limit, round(total / count)) if count >= MIN_FINISHED else limit

    def length_class(self, prompt: list[int], max_tokens: int | None) -> int:
        return max(0, self.predict(prompt, max_tokens)).bit_length()

    def record(self, prompt: list[int], output_tokens: int) -> None:
        """A request of the group finished with output_tokens tokens (each of its samples counts)."""
        group = self.group(prompt)
        counts = self.finished.setdefault(group, [0, 0])
        self.finished.move_to_end(group)
        if len(self.finished) > MAX_GROUPS:
            self.finished.popitem(last=False)
        before = counts[1] // counts[0] if counts[0] >= MIN_FINISHED else None
        counts[0] += 1
        counts[1] += output_tokens
        if counts[0] >= MIN_FINISHED and (before is None or
                                          (counts[1] // counts[0]).bit_length() != before.bit_length()):
            self.version += 1
