"""Boosts and suppression folded into rule_weight, plus the filters that make an item ineligible.

Missing flag values never boost or demote: an item with unknown age is not new, an item with no
quality score is not low quality (both are visible as the absence of the rule in the output).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mtrank.pipeline.scoring.config import ScoringConfig
from mtrank.pipeline.scoring.fate import Fate


@dataclass
class RuleWeights:
    weight: np.ndarray    # float64 multiplier per candidate
    eligible: np.ndarray  # bool: may be shown at all
    flags: np.ndarray     # int16 Fate bits


def rule_weights(cfg: ScoringConfig, n: int, *, item_age_days: np.ndarray | None = None,
                 in_campaign: np.ndarray | None = None, quality: np.ndarray | None = None) -> RuleWeights:
    weight = np.ones(n)
    eligible = np.ones(n, dtype=bool)
    flags = np.zeros(n, dtype=np.int16)

    def apply(mask: np.ndarray, multiplier: float | None, bit: Fate) -> None:
        nonlocal flags
        if multiplier is not None:
            weight[mask] *= multiplier
        else:
            eligible[mask] = False
        flags |= np.where(mask, np.int16(bit), np.int16(0))

    if cfg.new_item.enabled and item_age_days is not None:
        age = np.asarray(item_age_days, dtype=np.float64)
        apply(age < cfg.new_item.max_age_days, cfg.new_item.multiplier, Fate.BOOSTED_NEW)  # NaN: False
    if cfg.campaign.enabled and in_campaign is not None:
        apply(np.asarray(in_campaign, dtype=bool), cfg.campaign.multiplier, Fate.BOOSTED_CAMPAIGN)
    if cfg.low_quality.enabled and quality is not None:
        low = np.asarray(quality, dtype=np.float64) < cfg.low_quality.threshold
        if cfg.low_quality.action == "filter":
            apply(low, None, Fate.FILTERED_LOW_QUALITY)
        else:
            apply(low, cfg.low_quality.multiplier, Fate.DEMOTED_LOW_QUALITY)
    return RuleWeights(weight, eligible, flags)
