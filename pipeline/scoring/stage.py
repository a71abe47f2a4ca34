"""The scoring stage over columns: fuse task outputs, apply the rules, emit ranked lists.

Pure: no model, no files, no MLflow. The caller (jobs/score.py) predicts and reads side tables;
tests and benchmarks call this with any outputs they like.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mtrank.features.inputs import is_list_type
from mtrank.features.rules import is_time_type
from mtrank.pipeline.scoring.boosts import rule_weights
from mtrank.pipeline.scoring.config import ScoringConfig
from mtrank.pipeline.scoring.fate import Fate, counts, describe
from mtrank.pipeline.scoring.fusion import FusionPlan, ScoringError, fuse
from mtrank.pipeline.scoring.rerank import rerank

UNCAPPED = np.iinfo(np.int64).max // 4


@dataclass
class Scored:
    table: pa.Table                       # one row per candidate, requests in serving order, by rank
    summary: dict = field(default_factory=dict)


def _plain(arr: pa.ChunkedArray | pa.Array) -> pa.Array:
    arr = arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr
    return arr.dictionary_decode() if pa.types.is_dictionary(arr.type) else arr


def dense_codes(arr: pa.Array) -> tuple[np.ndarray, pa.Array]:
    """(codes, uniques): codes 0..U-1 numbered in ascending value order, so code order is value order."""
    enc = pc.dictionary_encode(_plain(arr))
    uniques = enc.dictionary
    order = pc.sort_indices(uniques).to_numpy()
    rank_of = np.empty(len(order), dtype=np.int64)
    rank_of[order] = np.arange(len(order))
    return rank_of[enc.indices.to_numpy(zero_copy_only=False)], uniques.take(pa.array(order))


def _floats(table: pa.Table, column: str | None) -> np.ndarray | None:
    if column is None or column not in table.column_names:
        return None
    return pc.fill_null(_plain(table[column]).cast(pa.float64()), np.nan).to_numpy(zero_copy_only=False)


def _lookup(uniques: pa.Array, keys: pa.Array) -> np.ndarray:
    """Code of each key among `uniques` (sorted), -1 where absent."""
    pos = pc.index_in(_plain(keys).cast(uniques.type), value_set=uniques)
    return pc.fill_null(pos, -1).to_numpy(zero_copy_only=False).astype(np.int64)


def serving_order(request_ids: pa.Array, ts: pa.Array | None,
                  time_name: str = "timestamp") -> tuple[np.ndarray, pa.Array]:
    """Request code per row in serving order (earliest request time first, then request id)."""
    rcode, runiq = dense_codes(request_ids)
    if ts is None:
        return rcode, runiq
    ts = _plain(ts)
    if not is_time_type(ts.type):
        raise ScoringError(f"column {time_name!r}: rule wrong_type: the spec's timestamp column must be a "
                           f"timestamp, date or integer, found {ts.type}")
    # a request without any time is served after every timed one (counted in the summary)
    t = pc.fill_null(ts.cast(pa.int64()), np.iinfo(np.int64).max).to_numpy(zero_copy_only=False)
    first = np.full(len(runiq), np.iinfo(np.int64).max)
    np.minimum.at(first, rcode, t)
    order = np.lexsort((np.arange(len(runiq)), first))
    position = np.empty(len(order), dtype=np.int64)
    position[order] = np.arange(len(order))
    return position[rcode], runiq.take(pa.array(order))


MAX_LIST_VALUES = 64   # values per candidate of a list attribute: [rows, L] codes stay a bounded size


def window_codes(column: pa.ChunkedArray, name: str) -> np.ndarray:
    """The window attribute as codes: one per row (-1 = null), or [rows, L] for a list column (genres,
    tags: -1 pads; a null list or null value shares nothing)."""
    arr = _plain(column)
    if not is_list_type(arr.type):
        return pc.fill_null(pc.dictionary_encode(arr).indices, -1).to_numpy(zero_copy_only=False).astype(np.int64)
    lengths = pc.fill_null(pc.list_value_length(arr), 0).to_numpy(zero_copy_only=False)
    width = int(lengths.max()) if len(lengths) else 0
    if width > MAX_LIST_VALUES:
        raise ScoringError(f"column {name!r}: rule window_list: a candidate lists {width} values; the N-pick-1 "
                           f"rule reads at most {MAX_LIST_VALUES} per candidate (window.attribute)")
    flat = _plain(pc.list_flatten(arr))   # null lists emit nothing, as their 0 length says
    codes = pc.fill_null(pc.dictionary_encode(flat).indices, -1).to_numpy(zero_copy_only=False).astype(np.int64)
    parents = np.repeat(np.arange(len(arr)), lengths)
    pos = np.arange(len(parents)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    out = np.full((len(arr), width), -1, dtype=np.int64)
    out[parents, pos] = codes
    return out


def item_budget(uniques: pa.Array, n_requests: int, cfg: ScoringConfig, caps: pa.Table | None,
                exposures: pa.Table | None) -> np.ndarray | None:
    """Exposures each item may still get today: cap minus existing exposures (never below 0)."""
    if not cfg.traffic_cap.enabled:
        return None
    cap = np.full(len(uniques), UNCAPPED if cfg.traffic_cap.default_cap is None else cfg.traffic_cap.default_cap,
                  dtype=np.int64)
    if caps is not None:
        code = _lookup(uniques, caps[cfg.item_column])
        hit = code >= 0
        cap[code[hit]] = caps["cap"].to_numpy()[hit]
    if exposures is not None and exposures.num_rows:
        code = _lookup(uniques, exposures[cfg.item_column])
        hit = code >= 0
        seen = np.bincount(code[hit], weights=exposures["exposures"].to_numpy()[hit], minlength=len(uniques))
        cap = np.where(cap >= UNCAPPED, cap, cap - seen.astype(np.int64))
    return np.where(cap >= UNCAPPED, n_requests + 1, np.maximum(cap, 0))


def missing_values(table: pa.Table, cfg: ScoringConfig, time_column: str | None) -> dict[str, int]:
    """Null / NaN values in the columns the enabled rules read: such an item is neither boosted nor
    demoted (and a request without time is served last), so the summary counts them."""
    cols = [time_column]
    if cfg.new_item.enabled:
        cols.append(cfg.new_item.column)
    if cfg.campaign.enabled:
        cols.append(cfg.campaign.column)
    if cfg.low_quality.enabled:
        cols.append(cfg.low_quality.column)
    out = {}
    for c in dict.fromkeys(x for x in cols if x and x in table.column_names):
        arr = _plain(table[c])
        n = arr.null_count
        if pa.types.is_floating(arr.type):
            n += int(pc.sum(pc.is_nan(arr)).as_py() or 0)
        out[c] = int(n)
    return out


def score_candidates(table: pa.Table, outputs: Mapping[str, np.ndarray], cfg: ScoringConfig, plan: FusionPlan, *,
                     request_column: str = "request_id", time_column: str | None = "ts",
                     campaign_items: pa.Array | None = None, caps: pa.Table | None = None,
                     exposures: pa.Table | None = None) -> Scored:
    """Rank the candidates in `table` (one row per request × item) given the model's `outputs`.

    `plan`: the fusion config resolved against the model's outputs (`fusion.resolve`).
    `exposures`: the day's existing exposures (item column, exposures); `caps`: (item column, cap).
    """
    n = table.num_rows
    if n == 0:
        raise ScoringError("no candidates to score")
    timed = time_column is not None and time_column in table.column_names
    request, requests = serving_order(table[request_column], table[time_column] if timed else None,
                                      time_column or "timestamp")
    item, items = dense_codes(table[cfg.item_column])
    columns = {}
    for fac in plan.factors:
        if fac.column is None or fac.exponent == 0:
            continue
        values = _floats(table, fac.column)
        if values is None:
            raise ScoringError(f"candidates have no column {fac.column!r} (fusion factor {fac.label!r})")
        if fac.on_bad_value == "error" and not (values > 0).all():
            bad = int((~(values > 0)).sum())
            first = table[request_column][int(np.flatnonzero(~(values > 0))[0])]
            raise ScoringError(f"column {fac.column!r}: rule on_bad_value: {bad:,} candidates have a missing, NaN "
                               f"or non-positive value (first in request {first}); set the factor's on_bad_value "
                               "to zero or filter")
        columns[fac.column] = values
    in_campaign = None
    if cfg.campaign.enabled:
        in_campaign = np.zeros(n, dtype=bool)
        if cfg.campaign.column is not None and cfg.campaign.column in table.column_names:
            try:
                flag = _plain(table[cfg.campaign.column]).cast(pa.bool_())
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
                raise ScoringError(f"column {cfg.campaign.column!r}: rule wrong_type: campaign.column must hold "
                                   f"booleans, 0/1 or 'true'/'false' ({str(e).splitlines()[0]})") from None
            in_campaign |= pc.fill_null(flag, False).to_numpy(zero_copy_only=False)
        if campaign_items is not None and len(campaign_items):
            active = np.zeros(len(items), dtype=bool)
            code = _lookup(items, campaign_items)
            active[code[code >= 0]] = True
            in_campaign |= active[item]
    rw = rule_weights(cfg, n, item_age_days=_floats(table, cfg.new_item.column), in_campaign=in_campaign,
                      quality=_floats(table, cfg.low_quality.column))
    cols, value_flags, valued = fuse(outputs, columns, rw.weight, plan)
    attribute = None
    if cfg.window.enabled:
        if cfg.window.attribute not in table.column_names:
            raise ScoringError(f"candidates have no column {cfg.window.attribute!r} (window.attribute)")
        attribute = window_codes(table[cfg.window.attribute], cfg.window.attribute)
    budget = item_budget(items, len(requests), cfg, caps, exposures)
    ranking = rerank(request, cols["score"], item, eligible=rw.eligible & valued, window=cfg.window,
                     attribute=attribute, budget=budget, list_size=cfg.list_size)
    flags = rw.flags | value_flags | ranking.flags

    rank = ranking.rank
    shown = rank > 0
    order = ranking.listing
    take = pa.array(order)
    out = {
        request_column: _plain(table[request_column]).take(take),
        cfg.item_column: _plain(table[cfg.item_column]).take(take),
        "rank": pa.array(rank[order], mask=~shown[order]),
        "score": pa.array(cols["score"][order]),
    }
    for name, values in outputs.items():   # at the model's own precision (float32): half the write of float64
        values = np.asarray(values)
        out[name] = pa.array(values[order] if values.dtype.kind == "f" else values.astype(np.float64)[order])
    for name in plan.factor_columns:   # diagnostics: float32 keeps 7 digits at half the write
        out[name] = pa.array(cols[name][order].astype(np.float32))
    out["rule_weight"] = pa.array(cols["rule_weight"][order])
    out["rules"] = describe(flags[order])
    out["rule_flags"] = pa.array(flags[order])
    result = pa.table(out)

    per_request = np.bincount(request[shown], minlength=len(requests))
    target = cfg.list_size or 0
    summary = {
        "rows_in": n, "requests": len(requests), "rows_shown": int(shown.sum()),
        "requests_short": int((per_request < target).sum()) if target else 0,
        "cap_rounds": ranking.cap_rounds,
        "items_capped": int(np.unique(item[(flags & int(Fate.CAPPED)) != 0]).size),
        "rules": counts(flags),
        "missing_values": missing_values(table, cfg, time_column if timed else None),
    }
    return Scored(result, summary)
