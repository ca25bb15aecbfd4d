"""Gemma 3's text model (transformers' Gemma3ForCausalLM, model type "gemma3_text") over the engine's flat batch.

Llama-shaped (its linears, embedding, rope tables and rope/KV-store op are models/llama.py's), but:
- every RMSNorm scales by (1 + weight), in fp32, and casts back after the scale (`GemmaRMSNorm`);
- four norms per layer: before and after attention, before and after the MLP, each output normed
  before it joins the residual stream (normed, added and normed for the next block in one op: the
  add between two norms); per-head q and k norms;
- a GELU-tanh gated MLP; embeddings scaled by sqrt(hidden), the factor rounded to the model's dtype;
- queries scaled by query_pre_attn_scalar ** -0.5 instead of head_dim ** -0.5;
- sliding and full layers interleaved (`config.layer_types`), each kind with its own rope parameters
  (`config.rope_parameters[layer_type]`: local base 10k, global 1M on the released models);
- the final logits soft-capped where the config says so (Gemma 3 releases do not; Gemma 2 did).
Each op is computed as transformers computes it, so fp32 greedy output is transformers' token for token;
in bf16 the fused CPU kernels (models/elementwise.py's GemmaOps) give the torch ops' bits. Where every
projection is on the int8 kernels and every op a fused one, a step's layers run in one C++ call
(models/layer_stack.py's GemmaLayerStack: the same ops in the same order, the same bits).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig

from tokenmill import kernels
from tokenmill.attention import AttentionBackend
from tokenmill.models import llama
from tokenmill.models.causal_lm import CausalLM, KVLayout, StepMetadata, sliding_windows
from tokenmill.models.checkpoint import Checkpoint
from tokenmill.models.elementwise import (
    ElementwiseOps,
    GemmaOps,
    select_elementwise_ops,
    select_gemma_ops,
    signed_sin,
)
from tokenmill.models.embedding import TokenEmbedding
from tokenmill.models.layer_stack import GemmaLayerStack, int8_projection
from tokenmill.models.linear import Linear
from tokenmill.models.quantized import Weight


def norm_scale(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A checkpoint's Gemma norm weight as the fp32 factor it scales by. NOTE: transformers keeps the weight
    in the model's dtype and adds the 1 in fp32 at each call."""
    return 1.0 + weight.to(dtype).float()


class GemmaRMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, ops: GemmaOps) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("scale", torch.ones(size), persistent=False)  # set by `load`
        self.ops = ops

    def load(self, weight: torch.Tensor, dtype: torch.dtype) -> None:
        self.scale = norm_scale(weight, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.rms_norm(x, self.scale, self.eps)

    def add_then(self, x: torch.Tensor, residual: torch.Tensor,
                 next_norm: GemmaRMSNorm) -> tuple[torch.Tensor, torch.Tensor]:
        """x (a block's output) normed by this norm and added to the residual stream, then the sum normed by
        `next_norm`: (next_norm(summed), summed)."""
        return self.ops.norm_add_norm(x, residual, self.scale, next_norm.scale, self.eps)


class Gemma3Attention(nn.Module):
    def __init__(self, config: PretrainedConfig, layer_index: int, window: int | None, ops: ElementwiseOps,
                 gemma_ops: GemmaOps) -> None:
        super().__init__()
        self.layer_index = layer_index
        self.window = window
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.attention_bias)
        self.o_proj = Linear(self.q_size, config.hidden_size, bias=config.attention_bias)
        self.eps = config.rms_norm_eps
        # q_norm's scale for each query head, then k_norm's for each key head: both norms in one call.
        self.register_buffer("qk_scale", torch.ones(self.num_heads + self.num_kv_heads, self.head_dim),
                             persistent=False)
        # NOTE: the backends scale scores by head_dim ** -0.5; Gemma wants query_pre_attn_scalar ** -0.5, so
        # the queries are scaled by the ratio, folded into q_norm's scale. It is 1 (nothing changes) where the
        # scalar is the head_dim, as on every Gemma 3 but the 27B.
        self.query_factor = math.sqrt(self.head_dim / config.query_pre_attn_scalar)
        self.ops = ops
        self.gemma_ops = gemma_ops

    def load_qk_norms(self, q_weight: torch.Tensor, k_weight: torch.Tensor, dtype: torch.dtype) -> None:
        q_scale = norm_scale(q_weight, dtype)
        if self.query_factor != 1.0:
            q_scale = q_scale * self.query_factor
        self.qk_scale = torch.cat((q_scale.expand(self.num_heads, -1), norm_scale(k_weight, dtype).expand(
            self.num_kv_heads, -1)))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache: torch.Tensor,
                attention: AttentionBackend, metas: StepMetadata) -> torch.Tensor:
        tokens = x.shape[0]
        qk, v = self.qkv_proj(x).split([self.q_size + self.kv_size, self.kv_size], dim=-1)
        qk = qk.view(tokens, self.num_heads + self.num_kv_heads, self.head_dim)
        qk = self.gemma_ops.rms_norm(qk, self.qk_scale, self.eps)
        kv_pool = kv_cache[self.layer_index]
        meta = metas[self.window]
        q = self.ops.rope_store(qk, v.view(tokens, self.num_kv_heads, self.head_dim), cos, sin, kv_pool[0],
                                kv_pool[1], meta.slot_mapping)
        return self.o_proj(attention.forward(q, kv_pool, meta).reshape(tokens, self.q_size))


class GeluTanhMLP(nn.Module):
    def __init__(self, config: PretrainedConfig, ops: GemmaOps) -> None:
        super().__init__()
        self.gate_up_proj = Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.ops = ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.ops.gelu_tanh_mul(self.gate_up_proj(x)))


class Gemma3DecoderLayer(nn.Module):
    def __init__(self, config: PretrainedConfig, layer_index: int, window: int | None, ops: ElementwiseOps,
                 gemma_ops: GemmaOps) -> None:
        super().__init__()
        self.layer_type = config.layer_types[layer_index]
        self.self_attn = Gemma3Attention(config, layer_index, window, ops, gemma_ops)
        self.mlp = GeluTanhMLP(config, gemma_ops)
        size, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = GemmaRMSNorm(size, eps, gemma_ops)
        self.post_attention_layernorm = GemmaRMSNorm(size, eps, gemma_ops)
        self.pre_feedforward_layernorm = GemmaRMSNorm(size, eps, gemma_ops)
        self.post_feedforward_layernorm = GemmaRMSNorm(size, eps, gemma_ops)

    def forward(self, x: torch.Tensor, normed: torch.Tensor, next_norm: GemmaRMSNorm, cos: torch.Tensor,
                sin: torch.Tensor, kv_cache: torch.Tensor, attention: AttentionBackend,
                metas: StepMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """x: the residual stream, `normed` its input_layernorm; each block's output is normed before it is added
        back, and the sum normed for what follows in the same op: `next_norm` is the next layer's input_layernorm
        (the final norm after the last layer). Returns (the new stream, next_norm of it)."""
        attended = self.self_attn(normed, cos, sin, kv_cache, attention, metas)
        normed, x = self.post_attention_layernorm.add_then(attended, x, self.pre_feedforward_layernorm)
        normed, x = self.post_feedforward_layernorm.add_then(self.mlp(normed), x, next_norm)
        return x, normed


NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm")


def check_supported(config: PretrainedConfig) -> None:
    """ValueError for what this module does not compute."""
    if getattr(config, "attn_logit_softcapping", None) is not None:
        raise ValueError("attention logit soft-capping (attn_logit_softcapping) is not supported")
    if getattr(config, "use_bidirectional_attention", False):
        raise ValueError("bidirectional attention (use_bidirectional_attention) is not supported")
    if config.hidden_activation != "gelu_pytorch_tanh":
        raise ValueError(f"activation {config.hidden_activation!r} is not supported")


class Gemma3ForCausalLM(CausalLM):
    def __init__(self, config: PretrainedConfig, max_positions: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        """As models/llama.py's LlamaForCausalLM."""
        super().__init__()
        check_supported(config)
        self.config = config
        self.dtype = dtype
        self.device = device
        ops = select_elementwise_ops(device, dtype, config.head_dim)
        gemma_ops = select_gemma_ops(device, dtype)
        windows = sliding_windows(config)
        self.kv_layout = KVLayout(config.num_attention_heads, config.num_key_value_heads, config.head_dim, windows)
        self.embed_tokens = TokenEmbedding(config.vocab_size, config.hidden_size, dtype)
        # NOTE: transformers rounds sqrt(hidden) to fp32, then to the model's dtype (bf16: 25.30 -> 25.25 on 270M).
        self.embed_scale = torch.tensor(config.hidden_size ** 0.5, device="cpu").to(dtype).item()
        self.layers = nn.ModuleList(Gemma3DecoderLayer(config, i, window, ops, gemma_ops)
                                    for i, window in enumerate(windows))
        self.norm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps, gemma_ops)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.softcap = getattr(config, "final_logit_softcapping", None)
        self.max_positions = max_positions
        # The layer types in the order they first come: the layer stack's groups.
        self.layer_kinds = tuple(dict.fromkeys(config.layer_types))
        self.rope: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # layer type -> cos, sin [rows, head_dim]
        self.layer_stack: GemmaLayerStack | None = None  # set by load_weights where it serves

    def reset_buffers(self) -> None:
        self._compute_rope(min(self.max_positions, llama.ROPE_ROWS_AT_START))

    def _compute_rope(self, rows: int) -> None:
        tables = {kind: llama.rope_tables(self.config, rows, layer_type=kind) for kind in self.layer_kinds}
        self.rope = {kind: (cos.to(self.device), sin.to(self.device)) for kind, (cos, sin) in tables.items()}

    def _cover_positions(self, positions: torch.Tensor) -> None:
        """Grows the rope tables (doubling) as models/llama.py's do."""
        rows = next(iter(self.rope.values()))[0].shape[0]
        needed = int(positions.max()) + 1 if positions.numel() else 0
        if needed > rows:
            self._compute_rope(min(self.max_positions, max(needed, 2 * rows)))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor,
                attention: AttentionBackend, metas: StepMetadata) -> torch.Tensor:
        x = self.embed_tokens(input_ids) * self.embed_scale
        self._cover_positions(positions)
        rope = {kind: (cos[positions].to(x.dtype), signed_sin(sin[positions].to(x.dtype)))
                for kind, (cos, sin) in self.rope.items()}
        if self.layer_stack is not None and (hidden := self.layer_stack.forward(
                x, [rope[kind] for kind in self.layer_kinds], kv_cache, metas)) is not None:
            return hidden
        layers: list[Gemma3DecoderLayer] = list(self.layers)
        normed = layers[0].input_layernorm(x)
        for layer, next_norm in zip(layers, [*(later.input_layernorm for later in layers[1:]), self.norm]):
            x, normed = layer(x, normed, next_norm, *rope[layer.layer_type], kv_cache, attention, metas)
        return normed

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.softcap is None:
            return self.lm_head.forward_fp32(hidden)
        logits = self.lm_head(hidden)  # soft-capped in the model's dtype, as transformers does
        return (torch.tanh(logits / self.softcap) * self.softcap).float()

    def load_weights(self, tensors: dict[str, Weight], lm_head: bool = True) -> None:
        """Fuses q/k/v and gate/up (models/checkpoint.py)."""
        checkpoint = Checkpoint(tensors, self.dtype, self.device)
        checkpoint.load_embedding_and_head(self.embed_tokens, self.lm_head, self.config.tie_word_embeddings, lm_head)
        self.norm.load(checkpoint.plain("model.norm.weight"), self.dtype)
        for i, layer in enumerate(self.layers):
            p = f"model.layers.{i}."
            attn = layer.self_attn
            checkpoint.load_linear(attn.qkv_proj, [f"{p}self_attn.{x}_proj" for x in "qkv"])
            checkpoint.load_linear(attn.o_proj, [f"{p}self_attn.o_proj"])
            checkpoint.load_linear(layer.mlp.gate_up_proj, [f"{p}mlp.gate_proj", f"{p}mlp.up_proj"])
            checkpoint.load_linear(layer.mlp.down_proj, [f"{p}mlp.down_proj"])
            attn.load_qk_norms(checkpoint.plain(f"{p}self_attn.q_norm.weight"),
                               checkpoint.plain(f"{p}self_attn.k_norm.weight"), self.dtype)
            for name in NORMS:
                getattr(layer, name).load(checkpoint.plain(f"{p}{name}.weight"), self.dtype)
        checkpoint.check_all_used()
        self.layer_stack = self.build_layer_stack()

    def build_layer_stack(self) -> GemmaLayerStack | None:
        """The layers as one C++ call for a whole step (models/layer_stack.py), where every projection is on the int8
        kernels and every elementwise op is a fused one; else None. A group per layer type, with its window."""
        fused = torch.ops.tokenmill if kernels.available() else None
        if fused is None:
            return None
        windows = {layer.layer_type: layer.self_attn.window for layer in self.layers}
        stack = GemmaLayerStack(self.kv_layout.num_heads, self.kv_layout.num_kv_heads, self.kv_layout.head_dim,
                                self.norm.eps, self.norm.scale, [windows[kind] for kind in self.layer_kinds])
        for layer in self.layers:
            attn, mlp, gemma_ops = layer.self_attn, layer.mlp, layer.input_layernorm.ops
            if type(attn) is not Gemma3Attention or type(mlp) is not GeluTanhMLP or attn.ops.rope_store != \
                    fused.rope_store or (gemma_ops.rms_norm, gemma_ops.norm_add_norm, gemma_ops.gelu_tanh_mul) != \
                    (fused.gemma_rms_norm, fused.gemma_norm_add_norm, fused.gelu_tanh_mul):
                return None
            projections = [int8_projection(linear) for linear in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj,
                                                                   mlp.down_proj)]
            if None in projections:
                return None
            stack.add_layer(self.layer_kinds.index(layer.layer_type), [getattr(layer, name).scale for name in NORMS],
                            attn.qk_scale, *projections)
        return stack


# Gemma 3's vocabulary (every size) ends a turn with <end_of_turn>, id 106; its generation_config.json and
# llama.cpp stop there as at <eos>.
END_OF_TURN = 106


def gguf_config_values(metadata: dict[str, Any], plain_tensor: Callable[[str], torch.Tensor],
                       tensor_names: set[str]) -> dict[str, Any]:
    """What a Gemma 3 GGUF's config needs beyond transformers' key table (models/gguf_file.py), read as
    llama.cpp reads the file (its src/models/gemma3.cpp): local layers where the file has a window, by its
    pattern (a list of flags, or a period; 6 where absent: a global layer after five local ones); the local
    layers' rope base (10k where absent) and the linear rope scaling only on the global layers; the query
    scale; a final soft-cap if the file has one; and the end-of-turn token as an end of generation."""
    layers, heads = metadata["gemma3.block_count"], metadata["gemma3.attention.head_count"]
    hidden = metadata["gemma3.embedding_length"]
    head_dim = metadata.get("gemma3.attention.key_length", hidden // heads)
    pattern = metadata.get("gemma3.attention.sliding_window_pattern", 6)
    if not metadata.get("gemma3.attention.sliding_window"):
        local = [False] * layers
    elif isinstance(pattern, list):
        local = [bool(flag) for flag in pattern[:layers]]
    else:
        local = [pattern == 0 or i % pattern < pattern - 1 for i in range(layers)]
    values: dict[str, Any] = {
        "layer_types": ["sliding_attention" if is_local else "full_attention" for is_local in local],
        "rope_local_base_freq": metadata.get("gemma3.rope.freq_base_swa", 10000.0),
        # NOTE: llama.cpp's query scale: hidden / heads on the 27B (62 layers; its config's 168), else the head_dim.
        "query_pre_attn_scalar": hidden // heads if layers == 62 else head_dim,
        "eos_token_id": [metadata.get("tokenizer.ggml.eos_token_id", 1), END_OF_TURN],
    }
    if metadata.get("gemma3.rope.scaling.type") == "linear":  # Gemma 3 4B and up
        values["rope_scaling"] = {"rope_type": "linear", "factor": metadata["gemma3.rope.scaling.factor"]}
    if softcap := metadata.get("gemma3.final_logit_softcapping"):
        values["final_logit_softcapping"] = softcap
    return values
