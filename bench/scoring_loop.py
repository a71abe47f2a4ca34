"""The straightforward way to score: one Python loop per request, one dict per candidate.

This is the baseline of the scoring benchmark and the oracle of the scoring tests: it implements
the same fusion and rules as pipeline/scoring (same formula, same operation order, same tie-break)
with no vectorisation and no cleverness, requests served one after another. The fusion walks the
plan's factors (`pipeline.scoring.fusion.resolve`) one by one, so it scores any spec's outputs.
"""
from __future__ import annotations

import math

import numpy as np
import pyarrow as pa

from mtrank.features.outputs import OutputKind
from mtrank.pipeline.scoring.config import ScoringConfig
from mtrank.pipeline.scoring.fate import Fate
from mtrank.pipeline.scoring.fusion import FusionPlan, ScoringError

INF = float("inf")


def _probability(plan: FusionPlan, name: str, task: str, out: dict) -> float:
    x = out[name]
    r = plan.keep_rates.get(task, 1.0)
    return x if r == 1.0 else x / (x + (1.0 - x) / r)


def _value(plan: FusionPlan, fac, out: dict, row: dict) -> tuple[float, int, bool]:
    """(value, flags, eligible) of one factor for one candidate."""
    o = fac.output
    if o is None:
        v = row[fac.column]
        if v is not None and not (isinstance(v, float) and math.isnan(v)) and v > 0:
            return float(v), 0, True
        if fac.on_bad_value == "error":
            raise ScoringError(f"column {fac.column!r}: rule on_bad_value: a candidate has a missing, NaN or "
                               "non-positive value")
        if fac.on_bad_value == "filter":
            return 0.0, int(Fate.FILTERED_VALUE), False
        return 0.0, int(Fate.VALUE_DEFAULTED), True
    if o.kind is OutputKind.REGRESSION:
        return out[o.name], 0, True
    if o.kind is OutputKind.PRODUCT and any(plan.keep_rates.get(t, 1.0) != 1.0 for t in o.targets):
        v = 1.0
        for t in o.targets:   # the product rebuilt from its re-calibrated parts
            v *= _probability(plan, plan.schema.own(t).name, t, out)
        return v, 0, True
    return _probability(plan, o.name, o.task, out), 0, True


def _factors(cfg: ScoringConfig, plan: FusionPlan, out: dict, row: dict, age, campaign: bool,
             quality) -> tuple[float, float, int, bool]:
    flags, eligible, weight = 0, True, 1.0
    if cfg.new_item.enabled and age is not None and not math.isnan(age) and age < cfg.new_item.max_age_days:
        weight *= cfg.new_item.multiplier
        flags |= Fate.BOOSTED_NEW
    if cfg.campaign.enabled and campaign:
        weight *= cfg.campaign.multiplier
        flags |= Fate.BOOSTED_CAMPAIGN
    if cfg.low_quality.enabled and quality is not None and quality < cfg.low_quality.threshold:
        if cfg.low_quality.action == "filter":
            eligible = False
            flags |= Fate.FILTERED_LOW_QUALITY
        else:
            weight *= cfg.low_quality.multiplier
            flags |= Fate.DEMOTED_LOW_QUALITY
    score = weight   # rule_weight first, then each factor in the plan's order (as `fuse` multiplies)
    for fac in plan.factors:
        if fac.exponent == 0:   # 0 ** 0 == 1: a zero exponent switches the factor off
            continue
        value, fl, ok = _value(plan, fac, out, row)
        flags |= fl
        eligible = eligible and ok
        base = fac.offset + value
        score *= base if fac.exponent == 1 else base ** fac.exponent
    return score, weight, int(flags), eligible


def _values(a) -> set:
    """The attribute values of one candidate: a list attribute's distinct values, a single value, or
    none (null shares nothing)."""
    if isinstance(a, list):
        return {x for x in a if x is not None}
    return set() if a is None else {a}


def score_loop(table: pa.Table, outputs: dict[str, np.ndarray], cfg: ScoringConfig, plan: FusionPlan, *,
               caps: dict | None = None, exposures: dict | None = None,
               campaign_items: set | None = None) -> tuple[list[int], list[int], list[float]]:
    """(rank, flags, score) per input row; rank 0 = not shown. `plan`: cfg.fusion resolved against
    the model's outputs."""
    cols = table.to_pydict()
    outs = {k: np.asarray(v, dtype=np.float64).tolist() for k, v in outputs.items()}
    n = table.num_rows
    names = list(outs)
    factor_columns = [f.column for f in plan.factors if f.column is not None and f.exponent != 0]
    for c in factor_columns:
        if c not in cols:
            raise ScoringError(f"candidates have no column {c!r}")
    rank, flags, scores, eligible = [0] * n, [0] * n, [0.0] * n, [True] * n
    requests: dict = {}
    none = [None] * n
    campaign_col = cols.get(cfg.campaign.column or "", none)
    age_col, quality_col = cols.get(cfg.new_item.column, none), cols.get(cfg.low_quality.column, none)
    ts_col = cols.get("ts", none)
    for i in range(n):
        item = cols[cfg.item_column][i]
        campaign = bool(campaign_col[i]) or \
            (campaign_items is not None and item in campaign_items)
        s, _, fl, ok = _factors(cfg, plan, {k: outs[k][i] for k in names}, {c: cols[c][i] for c in factor_columns},
                                age_col[i], campaign, quality_col[i])
        scores[i], flags[i], eligible[i] = s, fl, ok
        rid = cols["request_id"][i]
        ts = ts_col[i]
        r = requests.setdefault(rid, [ts, []])
        if ts is not None and ts < r[0]:
            r[0] = ts
        r[1].append(i)

    cap_on = cfg.traffic_cap.enabled
    left: dict = {}
    default = cfg.traffic_cap.default_cap
    w = cfg.window
    for rid in sorted(requests, key=lambda k: (requests[k][0], k)):
        rows = sorted(requests[rid][1], key=lambda i: (-scores[i], cols[cfg.item_column][i]))
        avail = []
        for i in rows:
            if not eligible[i]:
                continue
            item = cols[cfg.item_column][i]
            if cap_on:
                if item not in left:
                    cap = (caps or {}).get(item, default)
                    left[item] = INF if cap is None else cap - (exposures or {}).get(item, 0)
                if left[item] <= 0:
                    flags[i] |= Fate.CAPPED
                    continue
            avail.append(i)
        size = len(avail) if cfg.list_size is None else cfg.list_size
        placed: list[int] = []
        remaining = list(avail)
        while len(placed) < size and remaining:
            pick = None
            if w.enabled and w.n > 1:
                recent = [_values(cols[w.attribute][j]) for j in placed[max(0, len(placed) - (w.n - 1)):]]
                for i in remaining:
                    if all(sum(1 for x in recent if a in x) < w.k for a in _values(cols[w.attribute][i])):
                        pick = i
                        break
                if pick is None:
                    if w.fallback == "end":
                        break
                    pick = remaining[0]
                    flags[pick] |= Fate.WINDOW_RELAXED
            else:
                pick = remaining[0]
            placed.append(pick)
            remaining.remove(pick)
        slot = {i: s for s, i in enumerate(placed)}
        full = len(placed) >= min(size, len(rows))
        for pos, i in enumerate(avail):
            mine = slot.get(i, INF)
            if any(slot.get(j, INF) < mine for j in avail[pos + 1:]):
                flags[i] |= Fate.WINDOW_DEFERRED
            elif i not in slot:
                flags[i] |= Fate.CUT if full else Fate.WINDOW_DEFERRED
        for s, i in enumerate(placed):
            rank[i] = s + 1
            if cap_on:
                left[cols[cfg.item_column][i]] -= 1
    return rank, [int(f) for f in flags], scores
