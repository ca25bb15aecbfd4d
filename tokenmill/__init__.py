"""tokenmill: a batch inference engine for large language models."""

from tokenmill.engine.config import EngineConfig
from tokenmill.errors import RequestError
from tokenmill.llm import LLM
from tokenmill.outputs import CompletionOutput, Logprob, RequestOutput
from tokenmill.sampling_params import SamplingParams, StructuredOutputsParams

__all__ = ["LLM", "CompletionOutput", "EngineConfig", "Logprob", "RequestError", "RequestOutput", "SamplingParams",
           "StructuredOutputsParams"]
