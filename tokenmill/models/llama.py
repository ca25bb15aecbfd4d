"""The Llama family (Llama 2/3, Mistral, Qwen2, Qwen3, SmolLM) as one plain PyTorch module.

It takes the engine's flat ragged batch: all scheduled tokens of all requests in one row, with no
padding. The variants differ only in a few switches read from the `transformers` config.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from tokenmill.kernels import fused_elementwise
from tokenmill.models.attention import AttentionMetadata, paged_attention, store_kv


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """RMSNorm of residual + x (of x alone without a residual): (normed, residual + x)."""
        if x.dim() == 2 and fused_elementwise(x.dtype):
            if residual is None:
                return torch.ops.tokenmill.rms_norm(x, self.weight, self.eps), x
            return torch.ops.tokenmill.add_rms_norm(x, residual, self.weight, self.eps)
        if residual is not None:
            x = residual + x
        # NOTE: computed in fp32 and cast back before the weight, exactly as transformers does,
        # so greedy outputs match it token for token.
        # In-place steps where the operand is a fresh temporary: same values, fewer allocations.
        normed = x.float()
        normed = normed * normed.pow(2).mean(-1, keepdim=True).add_(self.eps).rsqrt_()
        return normed.to(x.dtype).mul_(self.weight), x  # the weight has the model's dtype


def rope_tables(config: PretrainedConfig, max_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin for every position, [max_positions, head_dim], via transformers' rope init."""
    params = getattr(config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        base = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        scaling = 1.0
    elif rope_type in ROPE_INIT_FUNCTIONS and rope_type != "dynamic":
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, None)
    else:
        raise ValueError(f"rope type {rope_type!r} is not supported")
    freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq.float())
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos() * scaling, emb.sin() * scaling


def signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """sin with its first half negated, for `apply_rope`: (-x) * s and x * (-s) are the same number."""
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, head_dim]; cos, sin_signed (from `signed_sin`): [T, head_dim]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((x[..., half:], x[..., :half]), dim=-1)
    out = x * cos[:, None, :]
    return out.add_(rotated.mul_(sin_signed[:, None, :]))


class Attention(nn.Module):
    def __init__(self, config: PretrainedConfig, layer_index: int) -> None:
        super().__init__()
        self.layer_index = layer_index
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        model_type = config.model_type
        qkv_bias = model_type == "qwen2" or bool(getattr(config, "attention_bias", False))
        o_bias = model_type not in ("qwen2", "qwen3") and bool(getattr(config, "attention_bias", False))
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = nn.Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=qkv_bias)
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=o_bias)
        self.qk_norm = model_type == "qwen3"
        if self.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        tokens = x.shape[0]
        qk, v = self.qkv_proj(x).split([self.q_size + self.kv_size, self.kv_size], dim=-1)
        qk = qk.view(tokens, self.num_heads + self.num_kv_heads, self.head_dim)
        v = v.view(tokens, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            qk = torch.cat((self.q_norm(qk[:, :self.num_heads])[0], self.k_norm(qk[:, self.num_heads:])[0]), dim=1)
        kv_pool = kv_cache[self.layer_index]
        if fused_elementwise(x.dtype) and self.head_dim % 32 == 0:
            q = torch.ops.tokenmill.rope_store(qk, v, cos, sin, kv_pool[0], kv_pool[1], meta.slot_mapping)
        else:
            # One rope call for the query and key heads together: half the small ops of two.
            qk = apply_rope(qk, cos, sin)
            q = qk[:, :self.num_heads]
            store_kv(qk[:, self.num_heads:], v, kv_pool, meta.slot_mapping)
        out = paged_attention(q, kv_pool, meta)
        return self.o_proj(out.reshape(tokens, self.q_size))


class MLP(nn.Module):
    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        bias = bool(getattr(config, "mlp_bias", False))
        self.intermediate = config.intermediate_size
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * self.intermediate, bias=bias)
        self.down_proj = nn.Linear(self.intermediate, config.hidden_size, bias=bias)
        if getattr(config, "hidden_act", "silu") != "silu":
            raise ValueError(f"activation {config.hidden_act!r} is not supported")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if fused_elementwise(x.dtype):
            return self.down_proj(torch.ops.tokenmill.silu_mul(gate_up))
        gate, up = gate_up.split(self.intermediate, dim=-1)
        return self.down_proj(nn.functional.silu(gate).mul_(up))


class DecoderLayer(nn.Module):
    def __init__(self, config: PretrainedConfig, layer_index: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_index)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                kv_cache: torch.Tensor, meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """x: the previous layer's output (the embeddings in the first layer), not yet added to the residual
        stream (None in the first layer): each add is fused with the norm after it. Returns (output, residual)."""
        normed, residual = self.input_layernorm(x, residual)
        x = self.self_attn(normed, cos, sin, kv_cache, meta)
        normed, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(normed), residual


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: PretrainedConfig, max_positions: int) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.max_positions = max_positions
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)
        self.reset_buffers()

    def reset_buffers(self) -> None:
        """Ties the embeddings and fills the rope tables; call again after moving off the meta device."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        if self.rope_cos.device.type != "meta":
            self.rope_cos, self.rope_sin = rope_tables(self.config, self.max_positions)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        """Returns the final hidden states, [T, hidden]; `compute_logits` turns chosen rows into logits."""
        x, residual = self.embed_tokens(input_ids), None
        cos = self.rope_cos[positions].to(x.dtype)
        sin = signed_sin(self.rope_sin[positions].to(x.dtype))
        for layer in self.layers:
            x, residual = layer(x, residual, cos, sin, kv_cache, meta)
        return self.norm(x, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()


def load_llama_weights(model: LlamaForCausalLM, tensors: dict[str, torch.Tensor]) -> None:
    """Copies a transformers state dict into the model, fusing q/k/v and gate/up."""
    def take(name: str) -> torch.Tensor:
        try:
            return tensors.pop(name)
        except KeyError:
            raise ValueError(f"weight {name!r} is missing from the checkpoint") from None

    params = dict(model.named_parameters())
    with torch.no_grad():
        params["embed_tokens.weight"].copy_(take("model.embed_tokens.weight"))
        params["norm.weight"].copy_(take("model.norm.weight"))
        if not model.config.tie_word_embeddings:
            params["lm_head.weight"].copy_(take("lm_head.weight"))
        tensors.pop("lm_head.weight", None)
        for i, layer in enumerate(model.layers):
            p = f"model.layers.{i}."
            attn = layer.self_attn
            for kind in ("weight", "bias"):
                parts = [f"{p}self_attn.{x}_proj.{kind}" for x in "qkv"]
                if getattr(attn.qkv_proj, kind) is not None:
                    getattr(attn.qkv_proj, kind).copy_(torch.cat([take(n) for n in parts]))
                if getattr(attn.o_proj, kind) is not None:
                    getattr(attn.o_proj, kind).copy_(take(f"{p}self_attn.o_proj.{kind}"))
                if getattr(layer.mlp.gate_up_proj, kind) is not None:
                    gate_up = [take(f"{p}mlp.gate_proj.{kind}"), take(f"{p}mlp.up_proj.{kind}")]
                    layer.mlp.gate_up_proj.get_parameter(kind).copy_(torch.cat(gate_up))
                    layer.mlp.down_proj.get_parameter(kind).copy_(take(f"{p}mlp.down_proj.{kind}"))
            if attn.qk_norm:
                attn.q_norm.weight.copy_(take(f"{p}self_attn.q_norm.weight"))
                attn.k_norm.weight.copy_(take(f"{p}self_attn.k_norm.weight"))
            layer.input_layernorm.weight.copy_(take(f"{p}input_layernorm.weight"))
            layer.post_attention_layernorm.weight.copy_(take(f"{p}post_attention_layernorm.weight"))
    unused = [n for n in tensors if "rotary_emb" not in n]
    if unused:
        raise ValueError(f"checkpoint has weights this model does not use: {unused[:5]}")
