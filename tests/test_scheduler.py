"""The scheduler on its own, on fake sequences (no model): how one step's token budget is split
between decodes and prompt chunks, priorities, which sequence is preempted, and n > 1 samples."""

from __future__ import annotations

from tokenmill.engine.scheduler import ScheduledBatch, Scheduler
from tokenmill.engine.sequence import Request, Sequence, Status
from tokenmill.kv.manager import KVCacheManager
from tokenmill.sampling_params import SamplingParams

BLOCK = 4


def make_scheduler(num_blocks: int = 64, max_num_seqs: int = 8, budget: int = 16) -> Scheduler:
    return Scheduler(KVCacheManager(num_blocks, BLOCK, enable_prefix_caching=True), max_num_seqs, budget)


def add(scheduler: Scheduler, name: str, prompt: list[int], n: int = 1, priority: int = 0) -> Request:
    request = Request(name, None, prompt, SamplingParams(n=n), 10_000, priority)
    scheduler.add_request(request)
    return request


def step(scheduler: Scheduler) -> dict[Sequence, int]:
    """Schedules one step and plays the model's part: each sequence that reached its end gets a token."""
    batch = scheduler.schedule()
    scheduler.advance(batch)
    for seq in batch.seqs:
        if seq.num_computed_tokens == seq.num_tokens:
            seq.token_ids.append(7)
    return planned(batch)


def planned(batch: ScheduledBatch) -> dict[Sequence, int]:
    return dict(zip(batch.seqs, batch.num_new_tokens))


def test_decodes_come_first_and_a_long_prompt_is_chunked_with_what_is_left() -> None:
    scheduler = make_scheduler(budget=16)
    a, b = add(scheduler, "a", list(range(10))), add(scheduler, "b", list(range(100, 106)))
    first = step(scheduler)
    assert first == {a.seqs[0]: 10, b.seqs[0]: 6}  # both prompts fit the budget exactly
    long = add(scheduler, "long", list(range(200, 240)))  # 40 tokens
    second = step(scheduler)
    assert second == {a.seqs[0]: 1, b.seqs[0]: 1, long.seqs[0]: 14}  # two decodes, then the rest of the budget
    third = step(scheduler)
    assert third == {a.seqs[0]: 1, b.seqs[0]: 1, long.seqs[0]: 14}
    fourth = step(scheduler)
    assert fourth == {a.seqs[0]: 1, b.seqs[0]: 1, long.seqs[0]: 12}  # the last chunk, then its first token
    assert long.seqs[0].num_output_tokens == 1


def test_a_step_never_exceeds_the_budget_nor_the_sequence_cap() -> None:
    scheduler = make_scheduler(budget=5, max_num_seqs=3)
    requests = [add(scheduler, f"r{i}", [i] * 3) for i in range(6)]
    for _ in range(6):
        batch = step(scheduler)
        assert sum(batch.values()) <= 5 and len(scheduler.running) <= 3
    assert all(r.seqs[0].status is Status.WAITING for r in requests[3:])  # never admitted: no seat


def test_lower_priority_values_are_admitted_first_and_take_seats_from_batch_work() -> None:
    scheduler = make_scheduler(max_num_seqs=2, budget=64)
    batch_work = [add(scheduler, f"batch{i}", [i] * 5, priority=1) for i in range(2)]
    step(scheduler)
    assert [s.request for s in scheduler.running] == batch_work
    interactive = add(scheduler, "chat", [9] * 5, priority=0)
    late_batch = add(scheduler, "batch-late", [8] * 5, priority=1)
    scheduled = step(scheduler)
    # The newest batch sequence gave its seat to the interactive request and waits at the head of its queue.
    assert interactive.seqs[0] in scheduled and batch_work[1].seqs[0] not in scheduled
    assert batch_work[1].seqs[0].status is Status.WAITING and batch_work[1].seqs[0].num_computed_tokens == 0
    assert scheduler.waiting.peek() is batch_work[1].seqs[0] and late_batch.seqs[0].status is Status.WAITING
    assert scheduler.num_preemptions == 1


def test_mixed_priorities_shorten_the_step() -> None:
    scheduler = make_scheduler(budget=64)
    add(scheduler, "batch", list(range(100)), priority=1)
    assert sum(step(scheduler).values()) == 64  # alone, batch work takes the whole budget
    add(scheduler, "chat", list(range(500, 540)), priority=0)
    assert sum(step(scheduler).values()) == 16  # a quarter of it while interactive work waits or runs


def test_out_of_blocks_the_newest_lowest_priority_sequence_is_preempted() -> None:
    scheduler = make_scheduler(num_blocks=6, budget=64)
    old = add(scheduler, "old", list(range(8)))  # 2 blocks each, and a third once they decode past 8
    mid = add(scheduler, "mid", list(range(10, 18)))
    new = add(scheduler, "new", list(range(20, 28)))
    step(scheduler)
    assert scheduler.kv.pool.num_free == 0
    # Each needs a third block for its 9th token: the newest is preempted, its two blocks go to the others.
    assert step(scheduler) == {old.seqs[0]: 1, mid.seqs[0]: 1}
    assert new.seqs[0].status is Status.WAITING and new.seqs[0].block_table == []
    assert new.seqs[0].num_computed_tokens == 0 and scheduler.waiting.peek() is new.seqs[0]
    assert scheduler.num_preemptions == 1


def test_batch_work_is_preempted_before_newer_interactive_work() -> None:
    scheduler = make_scheduler(num_blocks=6, budget=64)
    batch_work = add(scheduler, "batch", list(range(7)), priority=1)  # 2 blocks with its first token
    step(scheduler)
    chats = [add(scheduler, f"chat{i}", list(range(10 * i + 10, 10 * i + 17)), priority=0) for i in range(2)]
    step(scheduler)
    assert scheduler.kv.pool.num_free == 0
    # All three need a third block: the batch sequence, oldest but of the lowest priority, makes room.
    assert step(scheduler) == {chats[0].seqs[0]: 1, chats[1].seqs[0]: 1}
    assert batch_work.seqs[0].status is Status.WAITING and scheduler.num_preemptions == 1


def test_n_samples_take_a_seat_each_and_share_the_prompt_through_the_cache() -> None:
    scheduler = make_scheduler(max_num_seqs=4, budget=64)
    three = add(scheduler, "three", list(range(14)), n=3)
    other = add(scheduler, "other", list(range(50, 60)), n=2)
    scheduled = step(scheduler)
    first, *siblings = three.seqs
    # The first sample computes the prompt; the others find its 3 full blocks (12 tokens) and compute the rest.
    assert scheduled[first] == 14 and [scheduled[s] for s in siblings] == [2, 2]
    assert all(s.block_table[:3] == first.block_table[:3] for s in siblings)
    assert three.num_cached_tokens == 0
    # Four seats: the other request's second sample waits for one.
    assert other.seqs[0] in scheduled and other.seqs[1].status is Status.WAITING
    scheduler.finish(siblings[0], "stop")
    assert step(scheduler)[other.seqs[1]] == 2  # the seat freed; its prompt's 2 full blocks were cached


def test_finish_and_abort_give_the_blocks_back() -> None:
    scheduler = make_scheduler(num_blocks=8, budget=64)
    running, waiting = add(scheduler, "running", list(range(9)), n=2), add(scheduler, "waiting", [1] * 4)
    scheduler.max_num_seqs = 2
    step(scheduler)
    assert waiting.seqs[0].status is Status.WAITING
    scheduler.finish(running.seqs[0], "length")
    assert running.seqs[0].finish_reason == "length" and running.seqs[0] not in scheduler.running
    scheduler.abort(running)
    scheduler.abort(waiting)
    assert not scheduler.has_work() and scheduler.kv.pool.num_free == 8
    assert all(s.finished for s in running.seqs + waiting.seqs)
