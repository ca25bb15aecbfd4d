"""BERT-family encoders (BERT, MiniLM, bge, e5, all-MiniLM...) as one plain PyTorch module over packed batches.

It takes the embedding engine's packed batch: every token of every sequence in one row, no padding;
attention is bidirectional within each sequence (attention/encoder.py). Absolute position
embeddings, post-layer LayerNorms, the activation the config names. The token type is always 0,
as sentence-transformers feeds single texts. Where the kernels run, the GELUs are fused into the
up-projection's product and each residual add into the LayerNorm after it (models/elementwise.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig
from transformers.activations import ACT2FN

from tokenmill.attention.encoder import EncoderAttention, EncoderBatch, select_encoder_attention
from tokenmill.models.elementwise import AddLayerNorm, select_add_layer_norm
from tokenmill.models.linear import Linear
from tokenmill.models.linear_method import Activation

SUPPORTED_ENCODERS = ("BertModel", "BertForMaskedLM", "BertForPreTraining")
# config.hidden_act values a Linear applies itself (fused into the product where it can); others go through ACT2FN.
LINEAR_ACTIVATIONS: dict[str, Activation] = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}


class LayerNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.bias = nn.Parameter(torch.zeros(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


class ResidualLayerNorm(nn.Module):
    """LayerNorm(x + residual): a post-norm, through the op chosen for the model."""

    def __init__(self, size: int, eps: float, add_layer_norm: AddLayerNorm) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.bias = nn.Parameter(torch.zeros(size))
        self.eps = eps
        self.add_layer_norm = add_layer_norm

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.add_layer_norm(x, residual, self.weight, self.bias, self.eps)


class EncoderLayer(nn.Module):
    def __init__(self, config: PretrainedConfig, attention: EncoderAttention, add_layer_norm: AddLayerNorm) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = hidden // self.num_heads
        self.qkv_proj = Linear(hidden, 3 * hidden, bias=True)
        self.o_proj = Linear(hidden, hidden, bias=True)
        self.attention_norm = ResidualLayerNorm(hidden, config.layer_norm_eps, add_layer_norm)
        activation = LINEAR_ACTIVATIONS.get(config.hidden_act)
        self.up_proj = Linear(hidden, config.intermediate_size, bias=True, activation=activation)
        self.down_proj = Linear(config.intermediate_size, hidden, bias=True)
        self.mlp_norm = ResidualLayerNorm(hidden, config.layer_norm_eps, add_layer_norm)
        self.act = nn.Identity() if activation else ACT2FN[config.hidden_act]
        self.attention = attention

    def forward(self, x: torch.Tensor, batch: EncoderBatch) -> torch.Tensor:
        tokens = x.shape[0]
        q, k, v = self.qkv_proj(x).view(tokens, 3, self.num_heads, self.head_dim).unbind(1)
        attended = self.attention.forward(q, k, v, batch).reshape(tokens, -1)
        x = self.attention_norm(self.o_proj(attended), x)
        return self.mlp_norm(self.down_proj(self.act(self.up_proj(x))), x)


class BertModel(nn.Module):
    def __init__(self, config: PretrainedConfig, dtype: torch.dtype) -> None:
        super().__init__()
        if getattr(config, "position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"position embeddings {config.position_embedding_type!r} are not supported")
        self.config = config
        self.dtype = dtype
        hidden = config.hidden_size
        self.word_embeddings = nn.Parameter(torch.empty(config.vocab_size, hidden))
        self.position_embeddings = nn.Parameter(torch.empty(config.max_position_embeddings, hidden))
        self.token_type_embedding = nn.Parameter(torch.empty(hidden))  # type 0's row
        self.embedding_norm = LayerNorm(hidden, config.layer_norm_eps)
        attention = select_encoder_attention(config.num_attention_heads, hidden // config.num_attention_heads, dtype)
        self.attention = attention
        add_layer_norm = select_add_layer_norm(self.word_embeddings.device, dtype)
        self.layers = nn.ModuleList(EncoderLayer(config, attention, add_layer_norm)
                                    for _ in range(config.num_hidden_layers))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: EncoderBatch) -> torch.Tensor:
        """input_ids, positions: [T], the sequences one after another; returns the last hidden states [T, hidden]."""
        x = self.word_embeddings[input_ids] + self.position_embeddings[positions] + self.token_type_embedding
        x = self.embedding_norm(x)
        for layer in self.layers:
            x = layer(x, batch)
        return x


def load_bert_weights(model: BertModel, tensors: dict[str, torch.Tensor]) -> None:
    """Loads a transformers BERT state dict (with or without the "bert." prefix), fusing q/k/v; the pooler
    and any pre-training heads are not used (sentence-transformers pools the hidden states itself)."""
    prefix = "bert." if any(name.startswith("bert.") for name in tensors) else ""

    def take(name: str) -> torch.Tensor:
        try:
            return tensors.pop(prefix + name).to(model.dtype)
        except KeyError:
            raise ValueError(f"weight {prefix + name!r} is missing from the checkpoint") from None

    def load_linear(linear: Linear, names: list[str]) -> None:
        linear.load(torch.cat([take(f"{n}.weight") for n in names]), torch.cat([take(f"{n}.bias") for n in names]))

    def load_norm(norm: LayerNorm | ResidualLayerNorm, name: str) -> None:
        norm.weight.copy_(take(f"{name}.weight"))
        norm.bias.copy_(take(f"{name}.bias"))

    with torch.no_grad():
        model.word_embeddings.copy_(take("embeddings.word_embeddings.weight"))
        model.position_embeddings.copy_(take("embeddings.position_embeddings.weight"))
        model.token_type_embedding.copy_(take("embeddings.token_type_embeddings.weight")[0])
        load_norm(model.embedding_norm, "embeddings.LayerNorm")
        for i, layer in enumerate(model.layers):
            p = f"encoder.layer.{i}."
            load_linear(layer.qkv_proj, [f"{p}attention.self.{x}" for x in ("query", "key", "value")])
            load_linear(layer.o_proj, [f"{p}attention.output.dense"])
            load_norm(layer.attention_norm, f"{p}attention.output.LayerNorm")
            load_linear(layer.up_proj, [f"{p}intermediate.dense"])
            load_linear(layer.down_proj, [f"{p}output.dense"])
            load_norm(layer.mlp_norm, f"{p}output.LayerNorm")
    unused = [n for n in tensors if not n.startswith((f"{prefix}pooler.", "cls.")) and "position_ids" not in n]
    if unused:
        raise ValueError(f"checkpoint has weights this model does not use: {unused[:5]}")
