"""Engine parts on their own: the KV cache manager (prefix hits, reference counts, LRU eviction)
and sequence detokenization."""

from __future__ import annotations

from tokenmill.engine.sequence import Request
from tokenmill.kv.manager import KVCacheManager
from tokenmill.sampling_params import SamplingParams


def make_seq(tokens: list[int], n: int = 1) -> object:
    return Request("r", None, tokens, SamplingParams(n=n), 10_000).seqs[0]


def admit(kv: KVCacheManager, seq: object) -> list[int]:
    computed = kv.get_computed_blocks(seq)
    assert kv.allocate_slots(seq, seq.num_tokens - len(computed) * kv.block_size, computed)
    return computed


def test_shared_prefix_blocks_are_found_and_reference_counted() -> None:
    kv = KVCacheManager(num_blocks=10, block_size=4, enable_prefix_caching=True)
    a = make_seq(list(range(10)))  # 2 full blocks + 2 tokens
    assert admit(kv, a) == []
    assert len(a.block_table) == 3
    b = make_seq(list(range(8)) + [99, 98, 97])
    assert admit(kv, b) == a.block_table[:2]
    assert b.num_computed_tokens == 8
    assert [kv.pool.ref_counts[x] for x in a.block_table[:2]] == [2, 2]
    kv.free(a)
    kv.free(b)
    assert kv.pool.num_free == 10  # freed, but the full blocks stay findable
    c = make_seq(list(range(8)) + [5])
    assert len(admit(kv, c)) == 2


def test_last_token_is_always_computed() -> None:
    kv = KVCacheManager(num_blocks=10, block_size=4, enable_prefix_caching=True)
    a = make_seq(list(range(8)))
    admit(kv, a)
    kv.free(a)
    again = make_seq(list(range(8)))
    assert len(admit(kv, again)) == 1  # the second block holds the last token: recomputed
    assert again.num_computed_tokens == 4


def test_eviction_takes_the_least_recently_freed_block() -> None:
    kv = KVCacheManager(num_blocks=4, block_size=2, enable_prefix_caching=True)
    old, new = make_seq([1, 2, 3]), make_seq([7, 8, 9])
    admit(kv, old)
    admit(kv, new)
    kv.free(old)
    kv.free(new)
    assert kv.allocate_slots(make_seq([50, 51, 52]), 3)  # needs 2 blocks: the 2 unhashed partial ones
    assert kv.get_computed_blocks(make_seq([1, 2, 3])) and kv.get_computed_blocks(make_seq([7, 8, 9]))
    assert kv.allocate_slots(make_seq([60, 61]), 2)  # evicts the oldest full block, old's
    assert kv.get_computed_blocks(make_seq([1, 2, 3])) == []
    assert kv.get_computed_blocks(make_seq([7, 8, 9])) != []


def test_allocation_fails_cleanly_when_full() -> None:
    kv = KVCacheManager(num_blocks=2, block_size=4, enable_prefix_caching=False)
    a = make_seq(list(range(6)))
    assert kv.allocate_slots(a, 6)
    a.num_computed_tokens = 6  # as the engine does after the step
    before = (list(a.block_table), kv.pool.num_free)
    assert not kv.allocate_slots(a, 4)  # would need a third block
    assert (a.block_table, kv.pool.num_free) == before


def test_output_text_keeps_its_leading_space_on_metaspace_tokenizers() -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({"<unk>": 0, "▁Hello": 1, "▁world": 2, "▁Paris": 3}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    seq = make_seq([1])  # "Hello"
    assert "".join(seq.append_token(t, tokenizer) for t in [2, 3]) == " world Paris"


def test_output_text_completing_a_character_the_prompt_began_holds_only_that_character() -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tokenizer = Tokenizer(models.BPE({c: i for i, c in enumerate(sorted(alphabet))}, []))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()

    def byte_tokens(data: bytes) -> list[int]:  # one token a byte
        return [tokenizer.token_to_id(_byte_char(b)) for b in data]

    middle = "中".encode()  # E4 B8 AD
    seq = make_seq(byte_tokens(b"a" + middle[:1]))  # the prompt stops inside the character
    pieces = [seq.append_token(t, tokenizer) for t in byte_tokens(middle[1:] + b" ok")]
    assert "".join(pieces) == seq.text == "中 ok"


def _byte_char(b: int) -> str:
    """GPT-2's byte-level alphabet: the printable character that stands for byte b."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    if b in printable:
        return chr(b)
    return chr(256 + sorted(set(range(256)) - set(printable)).index(b))
