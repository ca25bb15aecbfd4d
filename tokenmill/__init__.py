"""tokenmill: a batch inference engine for large language models."""

from tokenmill import openmp_runtime  # noqa: F401  (first: it sets how OpenMP spins before torch loads it)
from tokenmill.engine.config import EngineConfig
from tokenmill.errors import RequestError
from tokenmill.llm import LLM
from tokenmill.outputs import CompletionOutput, EmbeddingOutput, EmbeddingRequestOutput, Logprob, RequestOutput
from tokenmill.pooling_params import PoolingParams
from tokenmill.sampling_params import SamplingParams, StructuredOutputsParams

__all__ = ["LLM", "CompletionOutput", "EmbeddingOutput", "EmbeddingRequestOutput", "EngineConfig", "Logprob",
           "PoolingParams", "RequestError", "RequestOutput", "SamplingParams",
           "StructuredOutputsParams"]
