"""The Llama family (Llama 2/3, Mistral, Qwen2, Qwen3, SmolLM) as one plain PyTorch module.

It takes the engine's flat ragged batch: all scheduled tokens of all requests in one row, with no
padding. The variants differ only in a few switches read from the `transformers` config.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from tokenmill import kernels
from tokenmill.attention import AttentionBackend
from tokenmill.models.causal_lm import CausalLM, KVLayout, StepMetadata, sliding_windows
from tokenmill.models.checkpoint import Checkpoint
from tokenmill.models.elementwise import TORCH_OPS, ElementwiseOps, select_elementwise_ops, signed_sin
from tokenmill.models.embedding import TokenEmbedding
from tokenmill.models.layer_stack import LlamaLayerStack, int8_projection
from tokenmill.models.linear import Linear
from tokenmill.models.quantized import Weight


def fused_or_parts(checkpoint: Checkpoint, fused: str, parts: list[str]) -> list[str]:
    """The checkpoint's layers for a fused one: the fused layer itself where stored so (Phi-3's qkv_proj
    and gate_up_proj), else its parts, stacked by rows."""
    return [fused] if f"{fused}.weight" in checkpoint.tensors else parts


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, ops: ElementwiseOps) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps
        self.ops = ops

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """RMSNorm of residual + x (of x alone without a residual): (normed, residual + x)."""
        if residual is None:
            return self.ops.rms_norm(x, self.weight, self.eps), x
        return self.ops.add_rms_norm(x, residual, self.weight, self.eps)


def head_dim_of(config: PretrainedConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def rope_tables(config: PretrainedConfig, max_positions: int, seq_len: int | None = None,
                layer_type: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin for every position, [max_positions, rotary dims] (the head_dim, or its share a config's
    partial_rotary_factor rotates), via transformers' rope init; `seq_len`: the sequence length a rope
    type that depends on it (longrope) chooses its frequencies for; `layer_type`: the layers' whose
    rope it is, where the config has rope parameters per layer type (Gemma 3's sliding and full layers)."""
    params = getattr(config, "rope_parameters", None) or {}
    if layer_type is not None:
        params = params[layer_type]
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        dim = int(head_dim_of(config) * params.get("partial_rotary_factor", 1.0))
        base = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        if factors := getattr(config, "rope_freq_factors", None):  # a GGUF's Llama 3.1+ scaling (gguf_file.py)
            inv_freq = inv_freq / torch.tensor(factors, dtype=torch.float32)
        scaling = 1.0
    elif rope_type in ROPE_INIT_FUNCTIONS and rope_type != "dynamic":
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, None, seq_len=seq_len, layer_type=layer_type)
    else:
        raise ValueError(f"rope type {rope_type!r} is not supported")
    freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq.float())
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos() * scaling, emb.sin() * scaling


class Attention(nn.Module):
    def __init__(self, config: PretrainedConfig, layer_index: int, window: int | None, ops: ElementwiseOps) -> None:
        super().__init__()
        self.layer_index = layer_index
        self.window = window
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = head_dim_of(config)
        model_type = config.model_type
        qkv_bias = model_type in ("qwen2", "qwen2_moe") or bool(getattr(config, "attention_bias", False))
        o_bias = model_type not in ("qwen2", "qwen3") and bool(getattr(config, "attention_bias", False))
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=qkv_bias)
        self.o_proj = Linear(self.q_size, config.hidden_size, bias=o_bias)
        self.ops = ops
        self.qk_norm = model_type in ("qwen3", "qwen3_moe")
        if self.qk_norm:
            # NOTE: per head, on [T, heads, D] slices of qk: the torch ops (the fused norm takes contiguous rows).
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps, TORCH_OPS)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps, TORCH_OPS)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache: torch.Tensor,
                attention: AttentionBackend, metas: StepMetadata) -> torch.Tensor:
        tokens = x.shape[0]
        qk, v = self.qkv_proj(x).split([self.q_size + self.kv_size, self.kv_size], dim=-1)
        qk = qk.view(tokens, self.num_heads + self.num_kv_heads, self.head_dim)
        v = v.view(tokens, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            qk = torch.cat((self.q_norm(qk[:, :self.num_heads])[0], self.k_norm(qk[:, self.num_heads:])[0]), dim=1)
        kv_pool = kv_cache[self.layer_index]
        meta = metas[self.window]
        q = self.ops.rope_store(qk, v, cos, sin, kv_pool[0], kv_pool[1], meta.slot_mapping)
        out = attention.forward(q, kv_pool, meta)
        return self.o_proj(out.reshape(tokens, self.q_size))


class MLP(nn.Module):
    def __init__(self, config: PretrainedConfig, ops: ElementwiseOps) -> None:
        super().__init__()
        bias = bool(getattr(config, "mlp_bias", False))
        self.gate_up_proj = Linear(config.hidden_size, 2 * config.intermediate_size, bias=bias)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, bias=bias)
        self.ops = ops
        if getattr(config, "hidden_act", "silu") != "silu":
            raise ValueError(f"activation {config.hidden_act!r} is not supported")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.ops.silu_mul(self.gate_up_proj(x)))

    def load_weights(self, checkpoint: Checkpoint, layer_prefix: str) -> None:
        """A layer's feed-forward weights (a mixture of experts in their place: models/moe.py)."""
        p = f"{layer_prefix}mlp."
        checkpoint.load_linear(self.gate_up_proj, fused_or_parts(checkpoint, f"{p}gate_up_proj",
                                                                 [f"{p}gate_proj", f"{p}up_proj"]))
        checkpoint.load_linear(self.down_proj, [f"{p}down_proj"])


class DecoderLayer(nn.Module):
    def __init__(self, config: PretrainedConfig, layer_index: int, window: int | None, ops: ElementwiseOps) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, ops)
        self.self_attn = Attention(config, layer_index, window, ops)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, ops)
        self.mlp = MLP(config, ops)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                kv_cache: torch.Tensor, attention: AttentionBackend,
                metas: StepMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """x: the previous layer's output (the embeddings in the first layer), not yet added to the residual
        stream (None in the first layer): each add is fused with the norm after it. Returns (output, residual)."""
        normed, residual = self.input_layernorm(x, residual)
        x = self.self_attn(normed, cos, sin, kv_cache, attention, metas)
        normed, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(normed), residual


ROPE_ROWS_AT_START = 4096


class LlamaForCausalLM(CausalLM):
    def __init__(self, config: PretrainedConfig, max_positions: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        """dtype and device: those the weights will have (the model may be built on the meta device first);
        they choose the elementwise ops."""
        super().__init__()
        self.config = config
        self.dtype = dtype
        self.device = device
        ops = select_elementwise_ops(device, dtype, head_dim_of(config))
        windows = sliding_windows(config)
        self.kv_layout = KVLayout(config.num_attention_heads, config.num_key_value_heads, head_dim_of(config), windows)
        self.embed_tokens = TokenEmbedding(config.vocab_size, config.hidden_size, dtype)
        self.layers = nn.ModuleList(DecoderLayer(config, i, window, ops) for i, window in enumerate(windows))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, ops)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.max_positions = max_positions
        self.layer_stack: LlamaLayerStack | None = None  # set by load_weights where it serves
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)
        self.reset_buffers()

    def reset_buffers(self) -> None:
        """Fills the rope tables' first rows; call again after moving off the meta device."""
        if self.rope_cos.device.type != "meta":
            self._set_rope_rows(min(self.max_positions, ROPE_ROWS_AT_START))

    def _set_rope_rows(self, rows: int) -> None:
        self.rope_cos, self.rope_sin = (table.to(self.device) for table in self.compute_rope_tables(rows))

    def compute_rope_tables(self, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [rows, head_dim] of the first `rows` positions (a family with another rope overrides it)."""
        return rope_tables(self.config, rows)

    def _cover_positions(self, positions: torch.Tensor) -> None:
        """Grows the rope tables (doubling) to cover the positions. NOTE: a 128k-token context's
        tables are 64 MB each and took 0.6 s at load; most jobs never reach such positions. Each
        row is computed by the same elementwise ops whatever the table's length, so rows are
        identical after a regrowth (tests/test_exactness.py runs past the first rows)."""
        needed = int(positions.max()) + 1 if positions.numel() else 0
        if needed > self.rope_cos.shape[0]:
            self._set_rope_rows(min(self.max_positions, max(needed, 2 * self.rope_cos.shape[0])))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor,
                attention: AttentionBackend, metas: StepMetadata) -> torch.Tensor:
        x, residual = self.embed_tokens(input_ids), None
        self._cover_positions(positions)
        cos = self.rope_cos[positions].to(x.dtype)
        sin = signed_sin(self.rope_sin[positions].to(x.dtype))
        if self.layer_stack is not None and \
                (hidden := self.layer_stack.forward(x, [(cos, sin)], kv_cache, metas)) is not None:
            return hidden
        for layer in self.layers:
            x, residual = layer(x, residual, cos, sin, kv_cache, attention, metas)
        return self.norm(x, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def load_weights(self, tensors: dict[str, Weight], lm_head: bool = True) -> None:
        """Fuses q/k/v and gate/up (models/checkpoint.py)."""
        checkpoint = Checkpoint(tensors, self.dtype, self.device)
        checkpoint.load_embedding_and_head(self.embed_tokens, self.lm_head, self.config.tie_word_embeddings, lm_head)
        checkpoint.copy_to(self.norm.weight, "model.norm.weight")
        for i, layer in enumerate(self.layers):
            p = f"model.layers.{i}."
            attn = layer.self_attn
            checkpoint.load_linear(attn.qkv_proj, fused_or_parts(checkpoint, f"{p}self_attn.qkv_proj",
                                                                 [f"{p}self_attn.{x}_proj" for x in "qkv"]))
            checkpoint.load_linear(attn.o_proj, [f"{p}self_attn.o_proj"])
            layer.mlp.load_weights(checkpoint, p)
            if attn.qk_norm:
                checkpoint.copy_to(attn.q_norm.weight, f"{p}self_attn.q_norm.weight")
                checkpoint.copy_to(attn.k_norm.weight, f"{p}self_attn.k_norm.weight")
            checkpoint.copy_to(layer.input_layernorm.weight, f"{p}input_layernorm.weight")
            checkpoint.copy_to(layer.post_attention_layernorm.weight, f"{p}post_attention_layernorm.weight")
        checkpoint.check_all_used()
        self.layer_stack = self.build_layer_stack()

    def build_layer_stack(self) -> LlamaLayerStack | None:
        """The layers as one C++ call for a whole step (models/layer_stack.py), where every layer is the plain
        Llama one on the int8 kernels and the fused elementwise ops, all under one window; else None."""
        fused = torch.ops.tokenmill if kernels.available() else None
        if len(self.kv_layout.distinct_windows) != 1 or fused is None:
            return None
        (window,) = self.kv_layout.distinct_windows
        stack = LlamaLayerStack(self.kv_layout.num_heads, self.kv_layout.num_kv_heads, self.kv_layout.head_dim,
                                self.norm.eps, self.norm.weight, window)
        for layer in self.layers:
            attn, mlp, ops = layer.self_attn, layer.mlp, layer.input_layernorm.ops
            if type(attn) is not Attention or type(mlp) is not MLP or attn.qk_norm or \
                    (ops.rms_norm, ops.add_rms_norm, ops.rope_store, ops.silu_mul) != \
                    (fused.rms_norm, fused.add_rms_norm, fused.rope_store, fused.silu_mul):
                return None
            projections = [int8_projection(linear) for linear in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj,
                                                                   mlp.down_proj)]
            if None in projections:
                return None
            stack.add_layer(layer.input_layernorm.weight, layer.post_attention_layernorm.weight, *projections)
        return stack
