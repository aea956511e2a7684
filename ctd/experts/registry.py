"""The experts by kind: ``expert.kind`` names one class, made from its config section."""

from __future__ import annotations

from ..config import ExpertConfig
from .base import Expert
from .classifier import ClassifierExpert
from .http import HTTPExpert
from .vllm import VLLMExpert

__all__ = ["EXPERTS", "expert_for"]

EXPERTS: dict[str, type] = {e.kind: e for e in (VLLMExpert, HTTPExpert, ClassifierExpert)}


def expert_for(cfg: ExpertConfig) -> Expert:
    """The configured expert (its section ``expert.<kind>``)."""
    return EXPERTS[cfg.kind](getattr(cfg, cfg.kind))
