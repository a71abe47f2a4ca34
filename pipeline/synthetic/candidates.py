"""Synthetic candidate days: what the scoring stage ranks (DESIGN.md "Scoring stage").

A candidate day holds `requests` feed requests x `per_request` candidate items, drawn from the same
universe (users, items, categories, shops, latent factors), the same day state (popularity,
discounts) and the same day features as the impression logs of that cfg and day, so a model trained
on the logs can score them. Rows carry every impression column except the labels; the hidden
ground truth stays (benchmarks only, never a model input), plus two item flags the scoring rules use:
`in_campaign` and `quality_score`.
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import numpy as np
import pyarrow as pa

from mtrank.pipeline.progress import Progress
from mtrank.pipeline.synthetic.impressions import (CHUNK_REQUESTS, SCHEMA, ImpressionConfig, WriteRate, _chunk_table,
                                            _day_base, _day_features, _DayWriter, _sample_core, _splitmix, _swap_in_day,
                                            _Universe)

CAND_TAG, CAMPAIGN_TAG, QUALITY_TAG = 0xFFFFFFF2, 0xFFFFFFF3, 0xFFFFFFF4
CHUNK_ROWS = CHUNK_REQUESTS * 30   # candidate rows per chunk (~123k), like an impression chunk
LOW_QUALITY = 0.2                  # quality_score below this counts as low quality
LABELS = ("click", "conversion", "stay_seconds", "collect", "cart")

CANDIDATE_SCHEMA = pa.schema([f for f in SCHEMA if f.name not in LABELS]
                             + [pa.field("in_campaign", pa.bool_()), pa.field("quality_score", pa.float64())])


@dataclass
class CandidateSummary(WriteRate):
    """What `generate_candidates` wrote."""
    out_dir: str
    day: str = ""
    files: list[str] = field(default_factory=list)
    requests: int = 0
    rows: int = 0                      # <= requests * per_request (duplicates within a request dropped)
    seconds: float = 0.0


def _unit(h: np.ndarray) -> np.ndarray:
    """uint64 hashes -> uniforms in (0, 1)."""
    return ((h >> np.uint64(11)).astype(np.float64) + 0.5) / 2.0**53


def _key(*entropy: int) -> np.uint64:
    return np.random.SeedSequence(list(entropy)).generate_state(1, np.uint64)[0]


def _campaign(cfg: ImpressionConfig, day: date, item: np.ndarray, rate: float) -> np.ndarray:
    """Whether each item is in the day's campaign: a hash of (seed, day, item), so per item."""
    h = _splitmix(_splitmix(item.astype(np.uint64) ^ _key(cfg.seed, day.toordinal(), CAMPAIGN_TAG)))
    return _unit(h) < rate


def _quality_scores(u: _Universe, low_quality_rate: float) -> np.ndarray:
    """quality_score in [0, 1] for every item of the universe (independent of the day).

    A noisy view of the hidden item quality (correlation about 0.5), mapped through its rank so
    that exactly `low_quality_rate` of the universe's items fall below LOW_QUALITY."""
    ni = u.cfg.n_items
    h = _splitmix(_splitmix(np.arange(ni, dtype=np.uint64) ^ _key(u.cfg.seed, 0, QUALITY_TAG)))
    v = _unit(h)
    noise = np.log(v / (1 - v)) * (np.sqrt(3.0) / np.pi)       # logistic noise, unit variance
    z = u.item_quality / max(float(np.std(u.item_quality)), 1e-12)
    latent = 0.5 * z + np.sqrt(0.75) * noise
    r = np.empty(ni)
    r[np.argsort(latent, kind="stable")] = (np.arange(ni) + 0.5) / ni   # rank in (0, 1)
    lo = low_quality_rate
    below = LOW_QUALITY * r / max(lo, 1e-12)
    above = LOW_QUALITY + (1 - LOW_QUALITY) * (r - lo) / max(1 - lo, 1e-12)
    return np.clip(np.where(r < lo, below, above), 0.0, 1.0)


def _dedupe(c: dict, n_items: int) -> dict:
    """Drop every later occurrence of an item within a request; positions set to 0 (unknown)."""
    req, item = c["req"], c["item"]
    key = req.astype(np.int64) * n_items + item
    o = np.argsort(key, kind="stable")
    dup = np.zeros(len(key), bool)
    dup[o[1:]] = key[o[1:]] == key[o[:-1]]
    keep = ~dup
    out = dict(c)
    for k in ("req", "item", "ad_source"):
        out[k] = c[k][keep]
    out["sizes"] = np.bincount(out["req"], minlength=c["n_req"])
    out["position"] = np.zeros(int(keep.sum()), np.int64)
    return out


def generate_candidates(out_dir: str | Path, cfg: ImpressionConfig, day: date, requests: int,
                        per_request: int = 100, campaign_rate: float = 0.05, low_quality_rate: float = 0.05,
                        progress: bool | None = None) -> CandidateSummary:
    """Write one candidate day as out_dir/dt=YYYY-MM-DD/part-NNNNN.parquet (CANDIDATE_SCHEMA).

    - `requests` feed requests, each with up to `per_request` distinct items drawn like impressions
      (70 % global popularity of the day, 30 % the user's preferred categories). Duplicates left
      after the generator's re-draws are dropped, so a request may hold slightly fewer items; the
      summary reports the rows actually written.
    - request_id "cYYYYMMDD-NNNNNNNNN" (never equal to an impression's "r..." id); all candidates of
      a request share one `ts`, spread over the day by the impressions' diurnal curve.
    - `position` is not known before ranking: it is 0 for every candidate. Serving scores every
      candidate at position 0, which neutralises the model's position effect at a fixed slot; the
      ground-truth columns (true_p_*, true_stay_seconds) are likewise computed at position 0.
    - `in_campaign`: about `campaign_rate` of the items, decided per (seed, day, item), so an item is
      in or out for every request of the day. `quality_score`: per (seed, item) in [0, 1], loosely
      correlated with the hidden item quality, about `low_quality_rate` of the items below 0.2.
    - Deterministic: the same cfg (seed, universe sizes, drift), day, requests and per_request give
      byte-identical files; another day gives other requests. The day is written to a hidden
      temporary folder and swapped in, like `generate_impressions`.
    """
    cfg.validate()
    if not isinstance(day, date):
        raise TypeError(f"day must be a date, got {day!r}")
    day = date(day.year, day.month, day.day)
    if int(requests) < 1:
        raise ValueError(f"requests must be >= 1, got {requests!r}")
    if not 1 <= int(per_request) <= cfg.n_items:
        raise ValueError(f"per_request must be in [1, n_items={cfg.n_items}], got {per_request!r}")
    for name, v in (("campaign_rate", campaign_rate), ("low_quality_rate", low_quality_rate)):
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {v!r}")
    requests, per_request = int(requests), int(per_request)
    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    u = _Universe(cfg)
    base = _day_base(u, day)
    feats = _day_features(u, base)
    quality = _quality_scores(u, low_quality_rate)
    chunk_req = max(1, CHUNK_ROWS // per_request)
    total_rows = per_request * requests
    summary = CandidateSummary(out_dir=str(out), day=f"{day:%Y-%m-%d}", requests=requests)

    def write(tmp: Path) -> list[Path]:
        writer = _DayWriter(tmp, cfg.rows_per_file, cfg.row_group_size, CANDIDATE_SCHEMA)
        with Progress("candidates", total=requests, unit="requests", enabled=progress) as bar, \
                ThreadPoolExecutor(max_workers=1, thread_name_prefix="mtrank-parquet") as pool:
            pending, first = None, 0
            for chunk in range((requests + chunk_req - 1) // chunk_req):
                n_req = min(chunk_req, requests - first)
                rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, day.toordinal(), CAND_TAG, chunk]))
                core = _sample_core(u, base, rng, n_req, first * per_request, total_rows,
                                    sizes=np.full(n_req, per_request, np.int64))
                core = _dedupe(core, cfg.n_items)
                t = _chunk_table(u, base, feats, rng, core, first, request_prefix="c")
                item = core["item"]
                cols = [t[f.name] for f in CANDIDATE_SCHEMA if f.name in t.schema.names]
                cols += [pa.array(_campaign(cfg, day, item, campaign_rate)), pa.array(quality[item])]
                table = pa.Table.from_arrays(cols, schema=CANDIDATE_SCHEMA)
                summary.rows += table.num_rows
                if pending is not None:
                    pending.result()
                pending = pool.submit(writer.write, table)
                first += n_req
                bar.update(n_req, day=f"{day:%Y-%m-%d}")
            pending.result()
        return writer.close()

    summary.files = [str(f) for f in _swap_in_day(out, day, write)]
    summary.seconds = time.perf_counter() - t0
    return summary
