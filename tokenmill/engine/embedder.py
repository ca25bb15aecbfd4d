"""The embedding engine: the same surface as `Engine`, for models that embed rather than generate.

An embedding request is one prompt, run whole in one step (no chunks: an encoder's attention is
bidirectional; no decode, so no KV cache is kept and no prefix cache applies). Each step packs
waiting prompts end to end, lower priority values and then older requests first, up to the
step's token budget and `max_num_seqs` (a budget below the model's context is raised to it, so
any valid prompt fits; one that does not fit what is left is passed over for later ones that
do), runs them through the model once, pools, and reports every one finished. Faces reach it
through the same `EngineClient`s as the generating engine.
"""

from __future__ import annotations

import heapq
import itertools
import logging
from dataclasses import dataclass, replace

import torch

from tokenmill.engine.config import EngineConfig, resolve_device, resolve_dtype
from tokenmill.engine.embedding_runner import DecoderRunner, EncoderRunner
from tokenmill.engine.engine import EngineMetrics, EngineStats, check_token_ids
from tokenmill.errors import INTERNAL_ERROR, RequestError
from tokenmill.models.bert import BertModel
from tokenmill.models.embedder_loader import load_embedder
from tokenmill.models.loader import load_tokenizer
from tokenmill.models.pooling import finish
from tokenmill.outputs import EmbeddingOutput, EmbeddingRequestOutput
from tokenmill.pooling_params import PoolingParams
from tokenmill.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

# Requests a step passes over for not fitting its budget before it stops looking: a full step is
# near at hand, and scanning the whole queue each step would cost more than the last tokens gain.
MAX_PASSED_OVER = 32


@dataclass
class _EmbeddingRequest:
    request_id: str
    prompt: str | None
    token_ids: list[int]
    params: PoolingParams

    def output(self, embedding: list[float] | None = None, error: RequestError | None = None) -> EmbeddingRequestOutput:
        return EmbeddingRequestOutput(self.request_id, self.prompt, self.token_ids,
                                      None if embedding is None else EmbeddingOutput(embedding), error)


class EmbeddingEngine:
    """Not thread-safe, as `Engine`; the same attributes may be read from other threads (see Engine)."""

    task = "embed"

    def __init__(self, config: EngineConfig) -> None:
        if resolve_device(config.device).type != "cpu" and config.device != "auto":
            raise ValueError(f"embedding models run on the CPU only, not device={config.device!r}")
        self.config = config
        self.dtype = resolve_dtype(config.dtype)
        loaded = load_embedder(config.model, self.dtype, config.max_model_len, config.quantization)
        self.model_path = loaded.path
        self.model_name = loaded.name
        self.quantization = loaded.quantization
        self.tokenizer = loaded.tokenizer if config.tokenizer is None else load_tokenizer(config.tokenizer)
        self.max_model_len = loaded.max_model_len
        self.vocab_size: int = loaded.config.vocab_size
        self.embedding_size: int = loaded.config.hidden_size
        self.pooling = loaded.pooling
        self.matryoshka = loaded.matryoshka
        self.structured = None  # no structured outputs: nothing is generated
        self.step_tokens = max(config.step_tokens(self.task), self.max_model_len)
        self.runner: EncoderRunner | DecoderRunner
        if isinstance(loaded.model, BertModel):
            self.runner = EncoderRunner(loaded.model, self.pooling.mode)
        else:
            self.runner = DecoderRunner(loaded.model, self.pooling.mode, self.step_tokens, config.max_num_seqs,
                                        config.block_size)
        logger.info("%s: embeds (%s pooling%s, %d dimensions), weights %s, activations %s", self.model_name,
                    self.pooling.mode, ", normalised" if self.pooling.normalize else "", self.embedding_size,
                    self.quantization, self.dtype)
        self.requests: dict[str, _EmbeddingRequest] = {}
        # (priority, arrival, request id); aborted requests are skipped when they come up.
        self._waiting: list[tuple[int, int, str]] = []
        self._arrivals = itertools.count()
        self.stats = EngineStats()

    def metrics(self) -> EngineMetrics:
        return EngineMetrics(replace(self.stats), 0, len(self.requests), 0.0, 0, 0)

    def add_request(self, request_id: str, prompt: str | None, token_ids: list[int],
                    params: SamplingParams | PoolingParams, priority: int = 0,
                    stream: bool = False) -> EmbeddingRequestOutput | None:
        """Queues a request; returns a finished output carrying a `RequestError` if it cannot run at
        all. `stream` changes nothing: an embedding is reported once. An id in use raises ValueError."""
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        request = _EmbeddingRequest(request_id, prompt, token_ids, PoolingParams())
        if not isinstance(params, PoolingParams):
            return request.output(error=RequestError("wrong_task", f"model {self.model_name} embeds text; "
                                                                   "it cannot generate"))
        request.params = params
        if error := self._check(token_ids, params):
            return request.output(error=error)
        self.requests[request_id] = request
        heapq.heappush(self._waiting, (priority, next(self._arrivals), request_id))
        return None

    def _check(self, token_ids: list[int], params: PoolingParams) -> RequestError | None:
        if error := check_token_ids(token_ids, self.vocab_size):
            return error
        if len(token_ids) > self.max_model_len:
            return RequestError("context_length_exceeded",
                                f"the input has {len(token_ids)} tokens; the model's context is {self.max_model_len}"
                                " tokens (truncate_prompt_tokens cuts longer inputs)", "prompt")
        if params.dimensions is not None:
            if not self.matryoshka:
                return RequestError("invalid_value", f"model {self.model_name} was not trained for shorter "
                                                     "embeddings (Matryoshka): dimensions is not supported",
                                    "dimensions")
            if params.dimensions > self.embedding_size:
                return RequestError("invalid_value", f"dimensions must be <= {self.embedding_size}, "
                                                     f"got {params.dimensions}", "dimensions")
        return None

    def abort_request(self, request_id: str) -> None:
        self.requests.pop(request_id, None)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def _schedule(self) -> list[_EmbeddingRequest]:
        """Waiting requests in order, first fit: one that does not fit what is left of the budget is
        passed over (it keeps its place) for later ones that do, so steps run full."""
        batch: list[_EmbeddingRequest] = []
        passed_over: list[tuple[int, int, str]] = []
        tokens = 0
        while (self._waiting and len(batch) < self.config.max_num_seqs and len(passed_over) < MAX_PASSED_OVER
               and tokens < self.step_tokens):
            entry = heapq.heappop(self._waiting)
            request = self.requests.get(entry[2])
            if request is None:  # aborted
                continue
            if tokens + len(request.token_ids) > self.step_tokens:
                passed_over.append(entry)
                continue
            batch.append(request)
            tokens += len(request.token_ids)
        for entry in passed_over:
            heapq.heappush(self._waiting, entry)
        return batch

    def step(self) -> list[EmbeddingRequestOutput]:
        """Runs one packed batch; returns its requests' outputs, all finished. An exception inside the
        step is logged and fails that batch's requests with an internal `RequestError`, as in `Engine`."""
        batch = self._schedule()
        if not batch:
            return []
        try:
            pooled = self.runner.run([r.token_ids for r in batch])
        except Exception as e:
            logger.exception("an embedding step failed; its %d requests fail", len(batch))
            error = RequestError(INTERNAL_ERROR, f"internal engine error ({type(e).__name__}: {e}); "
                                                 "the request can be retried")
            self.stats.requests_failed_internally += len(batch)
            return [self._finished(r, error=error) for r in batch]
        except BaseException:  # interrupted: the requests wait again, to run if the engine is used again
            for request in batch:
                heapq.heappush(self._waiting, (-1, next(self._arrivals), request.request_id))
            raise
        self.stats.steps += 1
        self.stats.computed_tokens += sum(len(r.token_ids) for r in batch)
        outputs = []
        for request, vector in zip(batch, pooled):
            normalize = self.pooling.normalize if request.params.normalize is None else request.params.normalize
            embedding: torch.Tensor = finish(vector, request.params.dimensions, normalize)
            outputs.append(self._finished(request, embedding.tolist()))
            self.stats.requests_finished += 1
            self.stats.prompt_tokens += len(request.token_ids)
        return outputs

    def _finished(self, request: _EmbeddingRequest, embedding: list[float] | None = None,
                  error: RequestError | None = None) -> EmbeddingRequestOutput:
        del self.requests[request.request_id]
        return request.output(embedding, error)
