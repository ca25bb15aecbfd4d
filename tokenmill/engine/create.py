"""The engine a configuration asks for: `Engine` for a model that generates, `EmbeddingEngine` for one
that embeds (models/embedder_loader.py decides which). Every face builds its engine here."""

from __future__ import annotations

from tokenmill.engine.config import EngineConfig
from tokenmill.engine.embedder import EmbeddingEngine
from tokenmill.engine.engine import Engine
from tokenmill.models.embedder_loader import model_task

AnyEngine = Engine | EmbeddingEngine


def create_engine(config: EngineConfig) -> AnyEngine:
    return EmbeddingEngine(config) if model_task(config.model, config.task) == "embed" else Engine(config)
