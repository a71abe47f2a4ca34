"""Scoring configuration: the fusion formula's parameters and each business rule, typed and strict.

Defaults are the documented starting point (README, "Scoring"); `mtrank tune-fusion` searches the
fusion parameters on a logged day. Unknown keys are errors, like every other mtrank config.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from mtrank.features.base import StrictConfig as _Strict


class Range(_Strict):
    """A search interval for `mtrank tune-fusion`: offsets are drawn log-uniformly (lo > 0), exponents
    uniformly."""
    lo: float = Field(ge=0, description="lower bound (> 0 for offsets)")
    hi: float = Field(ge=0, description="upper bound, > lo")

    @model_validator(mode="after")
    def _order(self) -> "Range":
        if not self.lo < self.hi:
            raise ValueError(f"lo {self.lo} must be < hi {self.hi}")
        return self


class FactorSearch(_Strict):
    offset: Range | None = Field(default=None, description="search range of the offset; null: kept fixed")
    exponent: Range | None = Field(default=None, description="search range of the exponent; null: kept fixed")

    @model_validator(mode="after")
    def _log(self) -> "FactorSearch":
        if self.offset is not None and self.offset.lo <= 0:
            raise ValueError("offset range: lo must be > 0 (offsets are searched log-uniformly)")
        return self


class Factor(_Strict):
    """One factor `(offset + value) ^ exponent` of the fused score.

    `value` is a model output named by the spec (`output: p_<task>`, a product, or a regression
    task's prediction) or a candidate column (`column: price`). Exponents are >= 0 so each factor is
    monotone non-decreasing in its value; 0 switches the factor off (and the output is then not needed).
    """
    name: str | None = Field(default=None, description="output column factor_<name>; default: the output "
                                                       "or column name")
    output: str | None = Field(default=None, description="a model output (see the model's spec)")
    column: str | None = Field(default=None, description="a numeric candidate column")
    offset: float = Field(default=0.0, ge=0, description="added to the value before the exponent")
    exponent: float = Field(default=1.0, ge=0, description="power of (offset + value); 0 switches the factor off")
    on_bad_value: Literal["zero", "filter", "error"] = Field(
        default="zero", description="column factors: a missing, NaN or <= 0 value counts as 0 (marked "
                                    "value_defaulted), filters the item out (marked), or fails naming the rows")
    search: FactorSearch | None = Field(default=None, description="tune-fusion bounds for offset / exponent")

    @model_validator(mode="after")
    def _source(self) -> "Factor":
        if (self.output is None) == (self.column is None):
            raise ValueError("a factor reads exactly one of `output` (a model output) or `column` (a candidate column)")
        if self.output is not None and self.on_bad_value != "zero":
            raise ValueError("on_bad_value applies to column factors (model outputs are checked, never defaulted)")
        return self

    @property
    def label(self) -> str:
        return self.name or self.output or self.column  # type: ignore[return-value]


class FusionConfig(_Strict):
    """score = Π (offset + value) ^ exponent over `factors`, × rule_weight.

    Checked against the model's spec when scoring starts. No factors: rank by the probability of the
    spec's first binary task trained on all rows. The demo's job YAML spells out its formula (six
    factors: three probabilities, an offset probability, price with an offset, a dwell prediction).
    """
    factors: tuple[Factor, ...] | None = Field(default=None, description="the factors multiplied into the "
                                               "score; null: rank by the probability of the spec's first binary task on all rows")
    negative_keep_rate: dict[str, float] = Field(
        default_factory=dict, description="task -> keep rate r of negatives in its training data; "
                                          "its probability is re-calibrated to p / (p + (1 - p) / r) before fusion")

    @model_validator(mode="after")
    def _check(self) -> "FusionConfig":
        for task, r in self.negative_keep_rate.items():
            if not 0 < r <= 1:
                raise ValueError(f"negative_keep_rate.{task} must be in (0, 1], got {r}")
        if self.factors is not None:
            if not self.factors:
                raise ValueError("factors: give at least one factor (or leave factors out for the default)")
            labels = [f.label for f in self.factors]
            dup = sorted({x for x in labels if labels.count(x) > 1})
            if dup:
                raise ValueError(f"factors: {', '.join(dup)} named twice (give one of them a `name`)")
        return self

    @property
    def columns(self) -> tuple[str, ...]:
        """Candidate columns the configured factors read."""
        return tuple(f.column for f in self.factors or () if f.column is not None)


class TuneConfig(_Strict):
    """What `mtrank tune-fusion` optimises on a logged day (task names are the spec's)."""
    gains: dict[str, float] | None = Field(
        default=None, description="task -> NDCG gain of a row positive on that task (the highest applies); "
                                  "default: 1 for binary tasks on all rows, 2 for the others")
    value_column: str | None = Field(default=None, description="logged column of a row's value (e.g. price): "
                                     "the `value` objective sums value × label over the top K")
    value_task: str | None = Field(default=None, description="the task whose positives realise the value "
                                   "(e.g. the purchase task); required with value_column")

    @model_validator(mode="after")
    def _pair(self) -> "TuneConfig":
        if (self.value_column is None) != (self.value_task is None):
            raise ValueError("value_column and value_task go together")
        for task, g in (self.gains or {}).items():
            if not g > 0:
                raise ValueError(f"gains.{task} must be > 0, got {g}")
        return self


class WindowRule(_Strict):
    """Category N-pick-1: any N consecutive slots hold at most k items sharing `attribute`."""
    enabled: bool = Field(default=True, description="false: no N-pick-1 rule (the attribute column is not needed)")
    attribute: str = Field(default="category_id", description="candidate column the rule spreads out (category, "
                                                              "brand, shop, ...)")
    n: int = Field(default=4, ge=1, description="window length in slots (1: no constraint)")
    k: int = Field(default=1, ge=1, le=127, description="items sharing the attribute allowed in any n consecutive slots")
    fallback: Literal["end", "relax"] = Field(
        default="end", description="no remaining item fits: end the list there, or take the best "
                                   "remaining item anyway and mark it window_relaxed")


class TrafficCap(_Strict):
    """Per-item daily exposure cap over existing exposures plus what this run allocates."""
    enabled: bool = Field(default=True, description="false: no exposure caps")
    default_cap: int | None = Field(default=2_000, ge=0, description="cap of items without their own; "
                                                                     "null = uncapped")
    caps_file: str | None = Field(default=None, description="Parquet (item column, cap) overriding default_cap")
    exposures_file: str | None = Field(default=None, description="Parquet (item column, dt, exposures) from "
                                                                 "`mtrank exposures`; rows of the scored date count")


class NewItemBoost(_Strict):
    enabled: bool = Field(default=True, description="false: no new-item boost (the column is not needed)")
    column: str = Field(default="item_age_days", description="candidate column of the item's age in days")
    max_age_days: float = Field(default=14.0, gt=0, description="boost items with age < this many days")
    multiplier: float = Field(default=1.2, gt=0, description="rule_weight factor of a new item")


class CampaignBoost(_Strict):
    enabled: bool = Field(default=True, description="false: no campaign boost")
    column: str | None = Field(default="in_campaign", description="boolean candidate column")
    items_file: str | None = Field(default=None, description="Parquet (item column, start_dt, end_dt): items "
                                                             "active on the scored date are in the campaign")
    multiplier: float = Field(default=1.3, gt=0, description="rule_weight factor of a campaign item")

    @model_validator(mode="after")
    def _source(self) -> "CampaignBoost":
        if self.enabled and self.column is None and self.items_file is None:
            raise ValueError("campaign boost needs a column or an items_file")
        return self


class LowQuality(_Strict):
    enabled: bool = Field(default=True, description="false: no low-quality rule (the column is not needed)")
    column: str = Field(default="quality_score", description="numeric candidate column of the item's quality")
    threshold: float = Field(default=0.2, description="items with score < threshold are low quality")
    action: Literal["demote", "filter"] = Field(default="demote", description="demote: multiply rule_weight by "
                                                "`multiplier`; filter: not shown")
    multiplier: float = Field(default=0.5, gt=0, lt=1, description="rule_weight factor of a demoted item")


class InferenceConfig(_Strict):
    """How `mtrank score` runs the model over the candidates. In fp32 the background thread changes
    no prediction: each is bit for bit a plain forward of the same chunk of rows."""
    precision: Literal["fp32", "bf16"] = Field(
        default="fp32", description="bf16: the bottom under bf16 autocast, towers in fp32 (as train.precision; "
                                    "CPUs with avx512_bf16 / AMX): faster, but predictions are no longer fp32's "
                                    "bit for bit")
    forward_rows: int = Field(default=16_384, ge=1, le=1_048_576,
                              description="candidate rows per forward pass (peak memory grows with it; another "
                                          "value may move a prediction by 1 ulp: the CPU's matrix kernels "
                                          "round by batch size)")
    overlap: bool | Literal["auto"] = Field(
        default="auto", description="read, validate and featurize the next chunk in a background thread while "
                                    "the model runs on the current one; auto: only where that thread has a core "
                                    "the forward does not use (a GPU forward, or more cores than torch threads; "
                                    "on a CPU whose every core runs the forward, the thread slows it by more "
                                    "than it hides)")


class ScoringConfig(_Strict):
    fusion: FusionConfig = Field(default=FusionConfig(), description="the fused score over model outputs and "
                                                                     "candidate columns")
    tune: TuneConfig = Field(default=TuneConfig(), description="the objectives of `mtrank tune-fusion`")
    window: WindowRule = Field(default=WindowRule(), description="category N-pick-1")
    traffic_cap: TrafficCap = Field(default=TrafficCap(), description="per-item daily exposure caps")
    new_item: NewItemBoost = Field(default=NewItemBoost(), description="boost of recently listed items")
    campaign: CampaignBoost = Field(default=CampaignBoost(), description="boost of campaign items")
    low_quality: LowQuality = Field(default=LowQuality(), description="demotion or filter of low-quality items")
    list_size: int | None = Field(default=50, gt=0, description="slots per request; null = rank every "
                                                               "eligible candidate")
    item_column: str = Field(default="item_id", description="candidate column of the item id (unique per "
                                                           "request; traffic caps count per item)")
    inference: InferenceConfig = Field(default=InferenceConfig(), description="how the model runs over the "
                                       "candidates (precision, rows per forward, overlap)")
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
