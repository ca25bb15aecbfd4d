"""lm-evaluation-harness against a real `tokenmill serve` (the default model, fp32, unquantized), on the two
small tasks kept in tests/lm_eval_tasks/: its loglikelihoods must equal those `transformers` computes on the
same weights, and its chat generations those of tokenmill's own Python API.

What lm-eval 0.4.13 sends and reads (lm_eval/models/openai_completions.py, lm_eval/models/api_models.py):

`local-completions`, loglikelihood requests (multiple_choice tasks): POST {base_url} with
    {"model": M, "prompt": P, "temperature": 0, "max_tokens": 1, "logprobs": 1, "seed": 1234, "echo": true}
and `Authorization: Bearer $OPENAI_API_KEY`. Each request is the context's tokens followed by the
continuation's, by lm-eval's own tokenizer (`tokenizer=` in model_args), without BOS. P is:
  - tokenized_requests=True (the default): a list of token-id lists, one per request of the batch
    (`batch_size` of them, longest first; a list of one at batch_size 1);
  - tokenized_requests=False: those lists decoded back to text (`tokenizer.batch_decode`): a plain string
    at batch_size 1, a list of strings above.
It reads `choices`, sorted by `index` and matched to the requests in order, and of each only
`logprobs.token_logprobs` and `logprobs.top_logprobs` (a dict token -> logprob per position):
    loglikelihood = sum(token_logprobs[ctxlen:-1])
    is_greedy = all(token_logprobs[i] == max(top_logprobs[i].values()) for i in ctxlen..len-2)
where ctxlen is the context's token count by lm-eval's tokenizer. So the echo must give one entry per
prompt token (the first may be null: it is never read) followed by exactly one for the generated token
(max_tokens is 1, not 0, and that last entry is dropped), and a text prompt must tokenize on the server
into the very tokens lm-eval counted. `tokens`, `text_offset`, `text` and `finish_reason` are not read.

`local-chat-completions`, generate_until requests (one conversation per request): POST {base_url} with
    {"messages": [{"role": "user", "content": <doc_to_text>}], "model": M, "max_tokens": <max_gen_toks>,
     "temperature": 0, "stop": <until>[:4], "seed": 1234}
It reads `choices[i].message.content`, by `index`, as it is: it cuts nothing at the stop strings itself.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lm_eval
import pytest
import torch
from lm_eval.tasks import TaskManager
from test_server import API_KEY, Server
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from tokenmill import LLM, SamplingParams
from tokenmill.models.loader import default_model_path

TASKS = Path(__file__).parent / "lm_eval_tasks"
CHOICE_TASK, GENERATION_TASK = "tokenmill_capitals", "tokenmill_short_answers"
STOPS, MAX_GEN_TOKS = ["\n", "."], 12  # tokenmill_short_answers.yaml's generation_kwargs
Pair = tuple[str, str]  # a loglikelihood request: (context, continuation)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    running = Server(default_model_path(), tmp_path_factory.mktemp("lm_eval_server"),
                     "--quantization", "none").start()
    yield running
    running.kill()


@pytest.fixture(scope="module")
def model_name(server: Server) -> str:
    return server.client().models.list().data[0].id


@pytest.fixture
def task_manager(monkeypatch: pytest.MonkeyPatch) -> TaskManager:
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)  # lm-eval's local models send it as the bearer token
    return TaskManager(include_path=str(TASKS), include_defaults=False)


def evaluate(model: str, model_args: dict[str, Any], task: str, task_manager: TaskManager,
             **options: Any) -> list[dict[str, Any]]:
    """Runs one task as a user of lm-eval would; returns its logged samples. `max_retries` 1: a refused
    request fails the run at once rather than after lm-eval's backoff."""
    results = lm_eval.simple_evaluate(model=model, model_args={**model_args, "max_retries": 1}, tasks=[task],
                                      task_manager=task_manager, log_samples=True, bootstrap_iters=0, **options)
    assert results is not None
    return results["samples"][task]


def transformers_loglikelihoods(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase,
                                pairs: list[Pair]) -> list[tuple[float, bool]]:
    """The oracle, for each (context, continuation): the sum of the continuation tokens' log_softmax given
    the context, and whether each is the argmax; tokenized as lm-eval splits a pair (the whole text's
    tokens, the context's count first). One right-padded forward pass: the pads come after every token
    scored, so the causal mask keeps them out."""
    splits = []
    for context, continuation in pairs:
        whole = tokenizer(context + continuation, add_special_tokens=False).input_ids
        context_tokens = tokenizer(context, add_special_tokens=False).input_ids
        assert whole[:len(context_tokens)] == context_tokens  # the split lm-eval makes is a true prefix
        splits.append((whole, len(context_tokens)))
    width = max(len(whole) for whole, _ in splits)
    ids = torch.tensor([whole + [0] * (width - len(whole)) for whole, _ in splits])
    mask = torch.tensor([[1] * len(whole) + [0] * (width - len(whole)) for whole, _ in splits])
    with torch.no_grad():
        logprobs = model(ids, attention_mask=mask).logits.log_softmax(dim=-1)
    results = []
    for row, (whole, context_length) in zip(logprobs, splits):
        targets = torch.tensor(whole[context_length:])
        predicted = row[context_length - 1:len(whole) - 1]
        chosen = predicted.gather(1, targets[:, None]).squeeze(1)
        results.append((chosen.sum().item(), bool((predicted.argmax(dim=-1) == targets).all())))
    return results


@pytest.fixture(scope="module")
def oracle(smol_dir: Path, smol_hf: torch.nn.Module) -> Callable[[list[Pair]], list[tuple[float, bool]]]:
    """`transformers_loglikelihoods` on the default model, each pair computed once for the module."""
    tokenizer = AutoTokenizer.from_pretrained(smol_dir)
    known: dict[Pair, tuple[float, bool]] = {}

    def loglikelihoods(pairs: list[Pair]) -> list[tuple[float, bool]]:
        missing = [pair for pair in dict.fromkeys(pairs) if pair not in known]
        if missing:
            known.update(zip(missing, transformers_loglikelihoods(smol_hf, tokenizer, missing)))
        return [known[pair] for pair in pairs]

    return loglikelihoods


@pytest.mark.parametrize(("tokenized_requests", "batch_size"), [(True, 8), (False, 1), (False, 4)],
                         ids=["token-lists", "one-string", "string-lists"])
def test_local_completions_loglikelihoods_equal_transformers(
        server: Server, model_name: str, task_manager: TaskManager, smol_dir: Path,
        oracle: Callable[[list[Pair]], list[tuple[float, bool]]], tokenized_requests: bool, batch_size: int) -> None:
    samples = evaluate("local-completions", {"base_url": f"{server.url}/v1/completions", "model": model_name,
                                             "tokenizer": str(smol_dir), "tokenized_requests": tokenized_requests},
                       CHOICE_TASK, task_manager, batch_size=batch_size)
    # Each sample logs its choices' (context, continuation) pairs and lm-eval's [(loglikelihood, is_greedy)] for each.
    scored = [(tuple(pair), response[0])
              for sample in samples for pair, response in zip(sample["arguments"], sample["resps"])]
    assert len(scored) == 30  # ten items, three choices each
    expected = oracle([pair for pair, _ in scored])
    for ((context, continuation), (loglikelihood, is_greedy)), (reference, greedy) in zip(scored, expected):
        assert loglikelihood == pytest.approx(reference, abs=1e-3), (context, continuation)
        assert is_greedy == greedy, (context, continuation)
    assert {greedy for _, greedy in expected} == {True, False}  # both occur: top_logprobs are checked as well


def test_local_chat_completions_generations_equal_the_python_api(
        server: Server, model_name: str, task_manager: TaskManager, smol_llm: LLM) -> None:
    samples = evaluate("local-chat-completions", {"base_url": f"{server.url}/v1/chat/completions",
                                                  "model": model_name},
                       GENERATION_TASK, task_manager, apply_chat_template=True)
    samples.sort(key=lambda sample: sample["doc_id"])
    # What lm-eval sent: the conversation it logged and the task's generation_kwargs. NOTE: the logged
    # conversation is lm-eval's JsonChatStr (a JSON string in a named tuple) turned into a plain 1-tuple.
    conversations = [json.loads(sample["arguments"][0][0][0]) for sample in samples]
    assert conversations[0] == [{"role": "user", "content": samples[0]["doc"]["question"]}]
    assert samples[0]["arguments"][0][1] == {"until": STOPS, "max_gen_toks": MAX_GEN_TOKS, "do_sample": False}
    served = [sample["resps"][0][0] for sample in samples]

    def greedy(max_tokens: int, stop: list[str] | None) -> list[str]:
        outputs = smol_llm.chat(conversations, SamplingParams(temperature=0, max_tokens=max_tokens, stop=stop),
                                use_tqdm=False)
        return [output.outputs[0].text for output in outputs]

    expected = greedy(MAX_GEN_TOKS, STOPS)
    assert served == expected
    # The items exercise both fields: a server ignoring either would answer differently.
    assert expected != greedy(MAX_GEN_TOKS, None) and expected != greedy(4 * MAX_GEN_TOKS, STOPS)
