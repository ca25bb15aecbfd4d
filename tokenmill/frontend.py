"""What the faces need of a model besides the engine's step loop: what it does (generate or embed),
its tokenizer and chat template, its name, context length and vocabulary, the engine's settings,
its sampling defaults (from its generation_config) and its grammar compiler.

One `Frontend` is built per engine (`Frontend.from_engine`, in the thread that built the engine)
and handed out by its clients (`EngineClient.frontend`); a process that prepares requests for
engines elsewhere (the Ray driver) builds the same from the engine's settings without loading the
weights (`Frontend.from_config`). Everything in it is safe to use from any
thread: the tokenizer is only read, and the grammar compiler is thread-safe. Faces tokenize and
compile grammars here, outside the engine's step loop, so that a long prompt or a slow grammar
never stalls the running batch.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers import AutoConfig, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

from tokenmill.engine.config import EngineConfig
from tokenmill.engine.engine import Engine
from tokenmill.engine.structured import StructuredOutputs
from tokenmill.errors import RequestError
from tokenmill.models.embedder_loader import model_task
from tokenmill.models.gguf_file import GGUFFile
from tokenmill.models.loader import (
    ModelLoadError,
    decoder_context,
    eos_token_ids,
    generation_defaults,
    load_tokenizer,
    model_name,
    read_generation_config,
    resolve_model_path,
)
from tokenmill.models.pooling import read_pooling_config
from tokenmill.sampling_params import StructuredOutputsParams

if TYPE_CHECKING:
    from tokenmill.engine.create import AnyEngine


@dataclass(frozen=True)
class Frontend:
    task: str  # "generate" or "embed"
    tokenizer: PreTrainedTokenizerBase
    model_name: str  # what responses report as the model
    quantization: str  # what the weights run as: "none", or the ggml block types kept ("Q4_K, Q6_K")
    max_model_len: int  # the context, prompt and generated tokens together
    vocab_size: int
    config: EngineConfig
    structured: StructuredOutputs | None  # None for an embedding model
    # SamplingParams field -> the model's default, for the fields a request leaves out (vLLM's
    # generation_config="auto"; empty with "vllm", for a GGUF and for an embedding model).
    generation_defaults: dict[str, Any]

    @classmethod
    def from_engine(cls, engine: AnyEngine) -> Frontend:
        defaults = engine.generation_defaults if isinstance(engine, Engine) else {}
        return cls(engine.task, engine.tokenizer, engine.model_name, engine.quantization, engine.max_model_len,
                   engine.vocab_size, engine.config, engine.structured, defaults)

    @classmethod
    def from_config(cls, config: EngineConfig) -> Frontend:
        """The frontend of the engine `config` would build, from the model's config and tokenizer
        alone (its weights are not read). `quantization` is then the setting, not what would run."""
        path = resolve_model_path(config.model)
        model_config, tokenizer = _config_and_tokenizer(path)
        if config.tokenizer is not None:
            tokenizer = load_tokenizer(config.tokenizer)
        max_model_len, vocab_size = decoder_context(model_config, config.max_model_len), model_config.vocab_size
        name = model_name(config.model)
        if model_task(config.model, config.task) == "embed":
            # NOTE: as load_embedder: a sentence-transformers folder's max_seq_length bounds the
            # context too (the pooling mode, which `encoder` would choose, is not needed here).
            try:
                seq_limit = read_pooling_config(path, encoder=False).max_seq_length if path.is_dir() else None
            except (ValueError, OSError, KeyError, StopIteration) as e:
                raise ModelLoadError(f"cannot read the pooling of {str(path)!r}: {e}") from e
            return cls("embed", tokenizer, name, config.quantization, min(max_model_len, seq_limit or max_model_len),
                       vocab_size, config, None, {})
        model_generation = read_generation_config(path) if path.is_dir() else None
        structured = StructuredOutputs(tokenizer, vocab_size, eos_token_ids(model_config, model_generation, tokenizer))
        return cls("generate", tokenizer, name, config.quantization, max_model_len, vocab_size, config, structured,
                   generation_defaults(model_generation, config.generation_config))

    def tokenize(self, prompt: str | list[int],
                 truncate_prompt_tokens: int | None = None) -> tuple[str | None, list[int]]:
        """A prompt's text (None for token ids) and token ids; with `truncate_prompt_tokens` (-1: the
        model's context), cut to that many tokens as the tokenizer truncates: its special tokens kept,
        on its truncation side (token ids are cut on that side too)."""
        if truncate_prompt_tokens is None:
            return (prompt, self.tokenizer.encode(prompt)) if isinstance(prompt, str) else (None, list(prompt))
        limit = self.max_model_len if truncate_prompt_tokens == -1 else truncate_prompt_tokens
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt, truncation=True, max_length=limit)
        ids = list(prompt)
        return None, ids[-limit:] if self.tokenizer.truncation_side == "left" else ids[:limit]

    def tokenize_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                      chat_template_kwargs: dict[str, Any] | None = None) -> tuple[str, list[int]]:
        """A conversation through the model's chat template: its text and token ids. A conversation
        the template rejects raises RequestError (param "messages")."""
        try:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt,
                                                      **(chat_template_kwargs or {}))
        except Exception as e:  # the template itself rejects the conversation (jinja raises anything)
            raise RequestError("invalid_messages", f"the chat template rejects the messages: {e}",
                               "messages") from e
        # NOTE: the template writes the special tokens itself (BOS included, where it has one).
        return text, self.tokenizer.encode(text, add_special_tokens=False)

    def compile(self, spec: StructuredOutputsParams) -> None:
        """Compiles a structured-output constraint into the grammar compiler's cache, where the
        engine then finds it. One that cannot compile raises RequestError (param "response_format")."""
        if self.structured is None:
            raise RequestError("wrong_task", f"model {self.model_name} embeds text: it has no structured outputs",
                               "response_format")
        try:
            self.structured.compile(spec)
        except ValueError as e:
            raise RequestError("invalid_value", str(e), "response_format") from None


def _config_and_tokenizer(path: Path) -> tuple[PretrainedConfig, PreTrainedTokenizerBase]:
    """A model's config and tokenizer as the loader reads them (models/loader.py), without its weights."""
    if path.is_file():
        try:
            gguf = GGUFFile(path)
            return gguf.config, gguf.tokenizer()
        except (ValueError, KeyError, IndexError, OSError, struct.error) as e:  # struct: a file cut short
            raise ModelLoadError(f"cannot read GGUF file {str(path)!r}: {e}") from e
    try:
        return AutoConfig.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read the config or tokenizer of {str(path)!r}: {e}") from e
