"""The weighted multiplicative fusion of task outputs, as pure column arithmetic.

Every factor is kept as its own column so a ranked list can be explained term by term.
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from pipeline.scoring.config import FusionConfig
from pipeline.scoring.fate import Fate

# Task outputs the formula reads (model output names): pCTR, pCVR, dwell seconds, p(cart|click),
# p(collect|click). Post-click probabilities, not the click-and-X products: pCTR multiplies them.
CTR, CVR, STAY, CART, COLLECT = "p_ctr", "p_cvr", "stay", "p_cart", "p_collect"
FACTORS = ("factor_ctr", "factor_cvr", "factor_price", "factor_stay", "factor_cart", "factor_collect")


class ScoringError(ValueError):
    """Predictions or candidates the scorer cannot use; says which column, rule and rows."""


def recalibrate(p: np.ndarray, keep_rate: float) -> np.ndarray:
    """Undo negative down-sampling at keep rate r: p' = p / (p + (1 - p) / r)."""
    if keep_rate == 1.0:
        return p
    return p / (p + (1.0 - p) / keep_rate)


def _check(name: str, x: np.ndarray, lo: float, hi: float, ids: np.ndarray | None) -> None:
    bad = ~((x >= lo) & (x <= hi))  # NaN fails both comparisons
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        where = f" (first at candidate {ids[i]!r})" if ids is not None else ""
        kind = "NaN" if np.isnan(x[i]) else f"{x[i]!r}"
        raise ScoringError(f"prediction {name}: {int(bad.sum()):,} values outside [{lo}, {hi}] or NaN, "
                           f"e.g. {kind}{where}; a model that emits these cannot be fused")


def required_outputs(cfg: FusionConfig) -> list[str]:
    """Outputs the formula needs: an exponent of 0 drops its task (a model may lack it)."""
    need = [CTR, CVR]
    need += [name for name, exp in ((STAY, cfg.a), (CART, cfg.b), (COLLECT, cfg.c)) if exp != 0]
    return need


def fuse(outputs: Mapping[str, np.ndarray], price: np.ndarray, rule_weight: np.ndarray,
         cfg: FusionConfig, ids: np.ndarray | None = None) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """(columns, flags): the factors, `rule_weight` and `score`, plus PRICE_DEFAULTED bits.

    `price` may hold NaN for missing; with bad_price "zero" such prices and those <= 0 count as 0.
    ("filter" and "error" are applied by the caller before ranking; here they also count as 0.)
    """
    missing = [k for k in required_outputs(cfg) if k not in outputs]
    if missing:
        raise ScoringError(f"the model has no output {', '.join(missing)}; the fusion formula needs it "
                           "(set its exponent to 0 to score without it)")
    p = {}
    for name in (CTR, CVR, CART, COLLECT):
        if name in outputs:
            x = np.asarray(outputs[name], dtype=np.float64)
            _check(name, x, 0.0, 1.0, ids)
            p[name] = recalibrate(x, cfg.negative_keep_rate.get(name.removeprefix("p_"), 1.0))
    n = len(p[CTR])
    one = np.ones(n)
    stay = None
    if STAY in outputs:
        stay = np.asarray(outputs[STAY], dtype=np.float64)
        _check(STAY, stay, 0.0, np.inf, ids)
    price = np.asarray(price, dtype=np.float64)
    bad_price = ~(price > 0)  # NaN, 0, negative
    cols = {
        "factor_ctr": p[CTR],
        "factor_cvr": cfg.alpha + p[CVR],
        "factor_price": cfg.beta + np.where(bad_price, 0.0, price),
        # 0 ** 0 == 1: a zero exponent switches a factor off even where its base is 0
        "factor_stay": np.power(stay, cfg.a) if cfg.a != 0 else one,
        "factor_cart": np.power(p[CART], cfg.b) if cfg.b != 0 else one,
        "factor_collect": np.power(p[COLLECT], cfg.c) if cfg.c != 0 else one,
        "rule_weight": np.asarray(rule_weight, dtype=np.float64),
    }
    score = cols["factor_ctr"] * cols["factor_cvr"]
    for k in ("factor_price", "factor_stay", "factor_cart", "factor_collect", "rule_weight"):
        score *= cols[k]
    cols["score"] = score
    flags = np.where(bad_price, np.int16(Fate.PRICE_DEFAULTED), np.int16(0)).astype(np.int16)
    return cols, flags
