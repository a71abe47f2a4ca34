"""Scoring configuration: the fusion formula's parameters and each business rule, typed and strict.

Defaults are the documented starting point (README, "Scoring"); `mtrank tune-fusion` searches the
fusion parameters on a logged day. Unknown keys are errors, like every other mtrank config.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FusionConfig(_Strict):
    """score = pCTR·(alpha + pCVR)·(beta + price)·stay^a·cart^b·collect^c·rule_weight.

    alpha keeps items that rarely convert in play (value of the click itself); beta keeps free or
    unpriced items in play. Exponents are >= 0 so each factor is monotone non-decreasing in its task.
    """
    alpha: float = Field(default=0.05, ge=0)
    beta: float = Field(default=1.0, gt=0, description="> 0 so an item with price 0 keeps a positive score")
    a: float = Field(default=0.2, ge=0, description="exponent of predicted dwell seconds")
    b: float = Field(default=0.2, ge=0, description="exponent of p(cart | click)")
    c: float = Field(default=0.1, ge=0, description="exponent of p(collect | click)")
    price_column: str = "price"
    bad_price: Literal["zero", "filter", "error"] = Field(
        default="zero", description="price missing, NaN or <= 0: count it as 0 (factor = beta, marked), "
                                    "filter the item out (marked), or fail naming the rows")
    negative_keep_rate: dict[str, float] = Field(
        default_factory=dict, description="task -> keep rate r of negatives in its training data; "
                                          "p is re-calibrated to p / (p + (1 - p) / r) before fusion")

    @model_validator(mode="after")
    def _rates(self) -> "FusionConfig":
        for task, r in self.negative_keep_rate.items():
            if not 0 < r <= 1:
                raise ValueError(f"negative_keep_rate.{task} must be in (0, 1], got {r}")
        return self


class WindowRule(_Strict):
    """Category N-pick-1: any N consecutive slots hold at most k items sharing `attribute`."""
    enabled: bool = True
    attribute: str = "category_id"
    n: int = Field(default=4, ge=1)
    k: int = Field(default=1, ge=1, le=127)
    fallback: Literal["end", "relax"] = Field(
        default="end", description="no remaining item fits: end the list there, or take the best "
                                   "remaining item anyway and mark it window_relaxed")


class TrafficCap(_Strict):
    """Per-item daily exposure cap over existing exposures plus what this run allocates."""
    enabled: bool = True
    default_cap: int | None = Field(default=2_000, ge=0, description="cap of items without their own; "
                                                                     "null = uncapped")
    caps_file: str | None = Field(default=None, description="Parquet (item_id, cap) overriding default_cap")
    exposures_file: str | None = Field(default=None, description="Parquet (item_id, dt, exposures) from "
                                                                 "`mtrank exposures`; rows of the scored date count")


class NewItemBoost(_Strict):
    enabled: bool = True
    column: str = "item_age_days"
    max_age_days: float = Field(default=14.0, gt=0, description="boost items with age < this many days")
    multiplier: float = Field(default=1.2, gt=0)


class CampaignBoost(_Strict):
    enabled: bool = True
    column: str | None = Field(default="in_campaign", description="boolean candidate column")
    items_file: str | None = Field(default=None, description="Parquet (item_id, start_dt, end_dt): items "
                                                             "active on the scored date are in the campaign")
    multiplier: float = Field(default=1.3, gt=0)

    @model_validator(mode="after")
    def _source(self) -> "CampaignBoost":
        if self.enabled and self.column is None and self.items_file is None:
            raise ValueError("campaign boost needs a column or an items_file")
        return self


class LowQuality(_Strict):
    enabled: bool = True
    column: str = "quality_score"
    threshold: float = Field(default=0.2, description="items with score < threshold are low quality")
    action: Literal["demote", "filter"] = "demote"
    multiplier: float = Field(default=0.5, gt=0, lt=1)


class ScoringConfig(_Strict):
    fusion: FusionConfig = FusionConfig()
    window: WindowRule = WindowRule()
    traffic_cap: TrafficCap = TrafficCap()
    new_item: NewItemBoost = NewItemBoost()
    campaign: CampaignBoost = CampaignBoost()
    low_quality: LowQuality = LowQuality()
    list_size: int | None = Field(default=50, gt=0, description="slots per request; null = rank every "
                                                               "eligible candidate")
    item_column: str = "item_id"
    on_bad_row: Literal["fail", "quarantine"] = Field(
        default="fail", description="null keys or a duplicate item in one request: fail naming file, "
                                    "column and count, or set the rows aside (counted)")

    def rules_off(self) -> "ScoringConfig":
        """The same fusion with every rule switched off (a pure sort by fused score)."""
        return self.model_copy(update={
            "window": self.window.model_copy(update={"enabled": False}),
            "traffic_cap": self.traffic_cap.model_copy(update={"enabled": False}),
            "new_item": self.new_item.model_copy(update={"enabled": False}),
            "campaign": self.campaign.model_copy(update={"enabled": False}),
            "low_quality": self.low_quality.model_copy(update={"enabled": False})})
