"""From a model's last hidden states to one embedding per sequence, as its sentence-transformers folder says.

A sentence-transformers folder lists its modules in `modules.json`: the Transformer, a Pooling
(`1_Pooling/config.json`: mean, CLS or last-token pooling) and optionally Normalize. The context
is `sentence_bert_config.json`'s `max_seq_length` where it sets one. A folder without
`modules.json` pools as vLLM does by default: CLS for encoders, the last token for decoders, then
normalises. Modules that would change the vectors further (Dense, LayerNorm...) are refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

POOLING_MODES = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls",
                 "pooling_mode_lasttoken": "last"}
_TRANSFORMER, _POOLING, _NORMALIZE = (f"sentence_transformers.models.{n}" for n in ("Transformer", "Pooling",
                                                                                   "Normalize"))


@dataclass(frozen=True)
class PoolingConfig:
    mode: str  # "mean", "cls" or "last"
    normalize: bool  # the default; a request's PoolingParams.normalize overrides it
    max_seq_length: int | None = None  # sentence-transformers' context, where the folder sets one


def read_pooling_config(folder: Path, encoder: bool) -> PoolingConfig:
    """The folder's pooling; raises ValueError for a module or a pooling mode tokenmill does not run."""
    modules_file = folder / "modules.json"
    if not modules_file.is_file():
        return PoolingConfig("cls" if encoder else "last", normalize=True)
    modules = json.loads(modules_file.read_text())
    types = [m.get("type") for m in modules]
    unsupported = [t for t in types if t not in (_TRANSFORMER, _POOLING, _NORMALIZE)]
    if unsupported or types[:2] != [_TRANSFORMER, _POOLING]:
        raise ValueError(f"sentence-transformers modules {unsupported or types} are not supported: tokenmill runs "
                         "a Transformer, a Pooling and optionally a Normalize module")
    pooling_path = folder / next(m["path"] for m in modules if m["type"] == _POOLING) / "config.json"
    settings = json.loads(pooling_path.read_text())
    chosen = [flag for flag, value in settings.items() if flag.startswith("pooling_mode_") and value]
    if len(chosen) != 1 or chosen[0] not in POOLING_MODES:
        raise ValueError(f"pooling {chosen} in {pooling_path} is not supported: one of "
                         f"{', '.join(POOLING_MODES)} must be set")
    max_seq_length = None
    if (bert_config := folder / "sentence_bert_config.json").is_file():
        max_seq_length = json.loads(bert_config.read_text()).get("max_seq_length")
    return PoolingConfig(POOLING_MODES[chosen[0]], _NORMALIZE in types, max_seq_length)


def pool(hidden: torch.Tensor, seq_starts: torch.Tensor, mode: str) -> torch.Tensor:
    """hidden: [T, H], the sequences one after another (seq_starts [B + 1]); returns [B, H] in fp32."""
    if mode == "cls":
        return hidden[seq_starts[:-1]].float()
    if mode == "last":
        return hidden[seq_starts[1:] - 1].float()
    lengths = seq_starts.diff()
    owner = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
    sums = torch.zeros(len(lengths), hidden.shape[1]).index_add_(0, owner, hidden.float())
    return sums / lengths[:, None]


def finish(embeddings: torch.Tensor, dimensions: int | None, normalize: bool) -> torch.Tensor:
    """A request's last steps: the first `dimensions` values kept (Matryoshka), then an L2 normalisation."""
    if dimensions is not None:
        embeddings = embeddings[..., :dimensions]
    return F.normalize(embeddings, p=2, dim=-1) if normalize else embeddings
