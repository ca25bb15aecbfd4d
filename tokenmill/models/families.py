"""The model families tokenmill generates with, by the architecture name transformers configs carry.

A new family is one module class meeting models/causal_lm.py's contract and one entry here (and, to
load it from GGUF, its names in models/gguf_file.py).
"""

from __future__ import annotations

from transformers import PretrainedConfig

from tokenmill.models.causal_lm import CausalLM
from tokenmill.models.gemma3 import Gemma3ForCausalLM
from tokenmill.models.llama import LlamaForCausalLM
from tokenmill.models.moe_llama import MoeForCausalLM
from tokenmill.models.phi3 import Phi3ForCausalLM

FAMILIES: dict[str, type[CausalLM]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": LlamaForCausalLM,
    "Phi3ForCausalLM": Phi3ForCausalLM,
    "Qwen2MoeForCausalLM": MoeForCausalLM,
    "Qwen3MoeForCausalLM": MoeForCausalLM,
    "MixtralForCausalLM": MoeForCausalLM,
    "Gemma3ForCausalLM": Gemma3ForCausalLM,
}
SUPPORTED_ARCHITECTURES = tuple(FAMILIES)


def family_of(config: PretrainedConfig) -> type[CausalLM]:
    """The module class for the config's architecture (a bare decoder body, e.g. an embedder's
    "Qwen3Model", is its family's too); ValueError for one tokenmill does not run."""
    architectures = getattr(config, "architectures", None) or []
    for architecture in architectures:
        if (family := FAMILIES.get(architecture) or FAMILIES.get(architecture.removesuffix("Model") + "ForCausalLM")):
            return family
    raise ValueError(f"unsupported architecture {architectures}; tokenmill runs {', '.join(SUPPORTED_ARCHITECTURES)}")
