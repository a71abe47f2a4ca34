"""Model hyper-parameters: a frozen, strict record so a typo in a config file fails loudly."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from mtrank.features.base import StrictConfig


class ModelConfig(StrictConfig):
    """Architecture knobs; task list and inputs come from the FeatureSpec, never from here."""

    bottom: Literal["shared_bottom", "omoe", "mmoe", "ple"] = Field(
        default="mmoe", description="shared-bottom MLP, one-gate MoE, multi-gate MoE or PLE")
    experts: int = Field(default=8, gt=0, description="MoE expert count; PLE: shared experts per level")
    expert_mlp: tuple[int, ...] = Field(default=(256, 128), min_length=1, description="hidden sizes of each "
                                        "expert (of the shared MLP for shared_bottom)")
    tower_mlp: tuple[int, ...] = Field(default=(64,), description="hidden sizes of each task tower, before its "
                                       "one-unit head")
    ple_levels: int = Field(default=2, gt=0, description="PLE: extraction levels")
    ple_task_experts: int = Field(default=1, gt=0, description="PLE: task-specific experts per task and level")
    esmm: bool = Field(default=True, description="train children with a parent on the entire-space "
                       "product (ESMM) instead of on clicked rows only")
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0, description="dropout rate in experts and towers")
