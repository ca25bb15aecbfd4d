"""Embedding models through the engine and the Python API, against their oracles: sentence-transformers on the
real all-MiniLM-L6-v2 folder, transformers' own forward on tiny random decoders used as embedders."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from sentence_transformers import SentenceTransformer
from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel, Qwen3Config, Qwen3Model

from tests.conftest import TOKENIZER_FILES, VOCAB
from tokenmill import LLM, kernels
from tokenmill.engine.config import EngineConfig
from tokenmill.engine.embedder import EmbeddingEngine
from tokenmill.outputs import EmbeddingRequestOutput
from tokenmill.pooling_params import PoolingParams


def random_sentences(tokenizer: object, count: int, max_tokens: int, seed: int = 0) -> list[str]:
    """Sentences of 1 to max_tokens tokens (special tokens included), of real vocabulary words."""
    words = sorted(w for w in tokenizer.get_vocab() if w.isalpha() and len(w) > 2)  # type: ignore[attr-defined]
    rng = random.Random(seed)
    sentences = []
    for _ in range(count):
        target = rng.randint(1, max_tokens)
        sentence = " ".join(rng.choice(words) for _ in range(target))
        ids = tokenizer(sentence, truncation=True, max_length=target)["input_ids"]  # type: ignore[operator]
        sentences.append(tokenizer.decode(ids, skip_special_tokens=True))  # type: ignore[attr-defined]
    return sentences


def vectors(outputs: list[EmbeddingRequestOutput]) -> torch.Tensor:
    assert all(o.error is None and o.outputs is not None for o in outputs)
    return torch.tensor([o.outputs.embedding for o in outputs])  # type: ignore[union-attr]


@pytest.fixture(scope="module")
def minilm(minilm_path: Path) -> LLM:
    return LLM(str(minilm_path), dtype="float32")


def test_minilm_equals_sentence_transformers_on_1000_sentences(minilm: LLM, minilm_path: Path) -> None:
    st = SentenceTransformer(str(minilm_path), device="cpu")
    sentences = random_sentences(st.tokenizer, 1000, 250)
    lengths = [len(st.tokenizer(s)["input_ids"]) for s in sentences]
    assert min(lengths) <= 3 and max(lengths) >= 240
    reference = torch.from_numpy(st.encode(sentences, batch_size=64))
    ours = vectors(minilm.embed(sentences, use_tqdm=False))
    assert F.cosine_similarity(ours, reference).min() >= 0.99999
    assert torch.allclose(ours.norm(dim=1), torch.ones(len(ours)), atol=1e-5)  # the folder's Normalize module


def test_embed_takes_vllm_prompt_forms_lazily_and_in_order(minilm: LLM) -> None:
    tokenizer = minilm.get_tokenizer()
    texts = ["first sentence", "a second, longer sentence than the first", "third"]
    expected = vectors(minilm.embed(texts, use_tqdm=False))
    forms = iter([texts[0], {"prompt": texts[1]}, {"prompt_token_ids": tokenizer.encode(texts[2])}])
    outputs = minilm.embed(forms, use_tqdm=False)
    assert torch.allclose(vectors(outputs), expected, atol=1e-6)
    assert outputs[0].prompt == texts[0] and outputs[2].prompt is None
    single = minilm.embed("first sentence", use_tqdm=False)
    assert torch.equal(vectors(single)[0], vectors(outputs)[0])


@pytest.mark.skipif(not kernels.available(), reason="batch invariance holds on tokenmill's AVX-512 kernels")
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_a_sequence_embeds_the_same_bits_alone_and_in_any_batch(minilm_path: Path, dtype: str) -> None:
    texts = random_sentences(AutoTokenizer.from_pretrained(minilm_path), 60, 200, seed=1)
    batched = vectors(LLM(str(minilm_path), dtype=dtype).embed(texts, use_tqdm=False))
    small_steps = LLM(str(minilm_path), dtype=dtype, max_num_batched_tokens=300, max_num_seqs=3)
    assert torch.equal(vectors(small_steps.embed(texts, use_tqdm=False)), batched)
    alone = torch.cat([vectors(small_steps.embed([t], use_tqdm=False)) for t in texts[:4]])
    assert torch.equal(alone, batched[:4])


def test_too_long_inputs_fail_alone_or_are_truncated_when_asked(minilm: LLM) -> None:
    long_text = "word " * 400
    outputs = minilm.embed(["short", long_text], use_tqdm=False)
    assert outputs[0].error is None
    assert outputs[1].error is not None and outputs[1].error.code == "context_length_exceeded"
    truncated = minilm.embed(long_text, PoolingParams(truncate_prompt_tokens=-1), use_tqdm=False)[0]
    tokenizer = minilm.get_tokenizer()
    assert truncated.prompt_token_ids == tokenizer.encode(long_text, truncation=True, max_length=256)
    assert truncated.prompt_token_ids[-1] == tokenizer.sep_token_id  # cut as the tokenizer cuts, [SEP] kept
    ids = minilm.embed({"prompt_token_ids": list(range(1000, 1300))}, PoolingParams(truncate_prompt_tokens=10),
                       use_tqdm=False)[0].prompt_token_ids
    assert ids == list(range(1000, 1010))


def test_pooling_params_normalize_and_dimensions(minilm: LLM) -> None:
    raw = vectors(minilm.embed("hello there", PoolingParams(normalize=False), use_tqdm=False))[0]
    normed = vectors(minilm.embed("hello there", use_tqdm=False))[0]
    assert raw.norm() > 1.5 and torch.allclose(F.normalize(raw, dim=0), normed, atol=1e-6)
    refused = minilm.embed("hello", PoolingParams(dimensions=128), use_tqdm=False)[0]
    assert refused.error is not None and refused.error.param == "dimensions" and "Matryoshka" in refused.error.message


def test_an_engine_says_which_task_it_serves(minilm: LLM, smol_llm: LLM) -> None:
    with pytest.raises(ValueError, match="embeds text: call embed"):
        minilm.generate("hello")
    with pytest.raises(ValueError, match="embeds text"):
        minilm.chat([{"role": "user", "content": "hello"}])
    with pytest.raises(ValueError, match="generates text"):
        smol_llm.embed("hello")
    assert minilm.frontend.task == "embed" and smol_llm.frontend.task == "generate"


def _sentence_transformers_files(folder: Path, pooling: str, normalize: bool, max_seq_length: int) -> None:
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "1_Pooling").mkdir()
    hidden = json.loads((folder / "config.json").read_text())["hidden_size"]
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": hidden, f"pooling_mode_{pooling}": True}))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_seq_length}))


def test_a_tiny_bert_with_cls_pooling_equals_sentence_transformers(tmp_path: Path, minilm_path: Path) -> None:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=128, hidden_act="gelu_new")
    BertModel(config).save_pretrained(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(minilm_path / name, tmp_path / name)
    _sentence_transformers_files(tmp_path, "cls_token", normalize=False, max_seq_length=100)
    st = SentenceTransformer(str(tmp_path), device="cpu")
    sentences = random_sentences(st.tokenizer, 50, 100, seed=2)
    llm = LLM(str(tmp_path), dtype="float32")
    assert llm.frontend.max_model_len == 100
    ours = vectors(llm.embed(sentences, use_tqdm=False))
    reference = torch.from_numpy(st.encode(sentences))
    assert F.cosine_similarity(ours, reference).min() >= 0.99999
    assert torch.allclose(ours, reference, atol=1e-4)  # not normalised: the folder has no Normalize module


@pytest.fixture(scope="module")
def qwen3_embedder(tmp_path_factory: pytest.TempPathFactory, smol_dir: Path) -> Path:
    """A tiny random Qwen3 embedder laid out as Qwen3-Embedding: a bare Qwen3Model checkpoint (no "model."
    prefix, no lm_head), last-token pooling, normalised, trained (by its config's word) for Matryoshka."""
    folder = tmp_path_factory.mktemp("qwen3-embedding")
    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=512,
                         initializer_range=0.3, tie_word_embeddings=True, is_matryoshka=True,
                         architectures=["Qwen3ForCausalLM"])
    Qwen3Model(config).save_pretrained(folder)
    saved = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**saved, "architectures": ["Qwen3ForCausalLM"]}))  # as the real one
    for name in TOKENIZER_FILES:
        if (smol_dir / name).exists():
            shutil.copy(smol_dir / name, folder / name)
    _sentence_transformers_files(folder, "lasttoken", normalize=True, max_seq_length=300)
    return folder


def _hf_last_token(folder: Path, prompts: list[list[int]]) -> torch.Tensor:
    model = AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return torch.cat([model(torch.tensor([p])).last_hidden_state[:, -1] for p in prompts])


@pytest.mark.parametrize("max_num_batched_tokens", [300, 4096])
def test_a_decoder_embedder_equals_transformers(qwen3_embedder: Path, max_num_batched_tokens: int) -> None:
    tokenizer = AutoTokenizer.from_pretrained(qwen3_embedder)
    prompts = [tokenizer.encode(s) for s in random_sentences(tokenizer, 30, 200, seed=3)]
    llm = LLM(str(qwen3_embedder), dtype="float32", max_num_batched_tokens=max_num_batched_tokens)
    assert llm.frontend.task == "embed" and llm.frontend.max_model_len == 300
    ours = vectors(llm.embed([{"prompt_token_ids": p} for p in prompts], use_tqdm=False))
    reference = F.normalize(_hf_last_token(qwen3_embedder, prompts), dim=1)
    assert torch.allclose(ours, reference, atol=1e-5)
    cut = vectors(llm.embed({"prompt_token_ids": prompts[0]}, PoolingParams(dimensions=16), use_tqdm=False))[0]
    assert torch.allclose(cut, F.normalize(reference[0, :16], dim=0), atol=1e-5)


def test_task_embed_makes_a_generative_llama_an_embedder(tiny_models: dict[str, Path]) -> None:
    folder = tiny_models["llama"]
    llm = LLM(str(folder), dtype="float32", task="embed")
    prompts = [[5, 6, 7, 8], list(range(100, 180)), [9]]
    ours = vectors(llm.embed([{"prompt_token_ids": p} for p in prompts], use_tqdm=False))
    assert torch.allclose(ours, F.normalize(_hf_last_token(folder, prompts), dim=1), atol=1e-5)
    refused = llm.embed({"prompt_token_ids": [5]}, PoolingParams(dimensions=8), use_tqdm=False)[0]
    assert refused.error is not None and refused.error.param == "dimensions"


def test_a_step_passes_over_a_prompt_that_does_not_fit_for_later_ones_that_do(minilm_path: Path) -> None:
    engine = EmbeddingEngine(EngineConfig(model=str(minilm_path), dtype="float32", max_num_batched_tokens=256))
    for name, length in (("a", 200), ("b", 150), ("c", 50)):
        assert engine.add_request(name, None, [101] + [2000] * (length - 2) + [102], PoolingParams()) is None
    assert [o.request_id for o in engine.step()] == ["a", "c"]
    assert [o.request_id for o in engine.step()] == ["b"]
    assert not engine.has_unfinished_requests() and engine.metrics().stats.prompt_tokens == 400
