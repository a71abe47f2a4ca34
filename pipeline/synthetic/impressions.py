"""Synthetic impression logs with hidden ground truth (the input contract of DESIGN.md).

Why synthetic: training, evaluation and benchmarks need logs whose true click / post-click
probabilities are known, so that a model's AUC can be compared with the oracle's.

Structure of the generator
- A *universe* (users, items, categories, shops, latent factors, label-model weights) drawn from
  `SeedSequence([seed, 0, tag])`. It depends only on the seed and the universe sizes, never on the
  dates, so any day can be generated on its own.
- A *day state* (popularity order, discounts, rolling numeric features) from
  `SeedSequence([seed, ordinal, DAY_TAG])`, and *chunks* of `CHUNK_REQUESTS` requests from
  `SeedSequence([seed, ordinal, chunk_index])`. A day's rows therefore depend only on
  (seed, date, universe params, rows_per_day), and a day with fewer rows is a prefix of one with more.
- Label model: users and items have latent vectors (dim `DIM`); their element-wise product z is
  projected on one unit direction per task. Click uses w_click; post-click task t uses
  w_t = rho*w_click + sqrt(1-rho^2)*w_t_perp (orthonormal w_t_perp), as in the MMoE paper's
  synthetic study, so `task_correlation` = rho sets how related the tasks are. Task-specific effects
  (price, discount, shop rating, position, context ...) are added on top, and the biases are
  calibrated on a fixed sample so the marginal rates match BENCHMARKS.md whatever the knobs.
- Sample selection on an observed feature (`selection` > 0, off by default; the ESMM study): each
  query topic gets a purchase intent ~ N(0, selection^2), added to both the click and the
  conversion logit. Clicks then come mostly from high-intent topics, so the clicked rows' conversion
  rate is far above that of the impressions as a whole, and the topic is seen only through
  `query_topic` (no rolling feature aggregates it): its intent can be learnt from the click signal of
  every impression, but hardly from the few clicked rows of a low-intent topic. Drawn from its own
  stream, so with selection = 0 the logs are unchanged byte for byte.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import date
from functools import lru_cache
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mtrank.pipeline.progress import Progress

DIM = 8                      # latent dimension of users / items
CHUNK_REQUESTS = 4096        # requests per chunk (~123k rows): bounds memory, keeps numpy efficient
ZIPF_OFFSET = 10.0           # Zipf-Mandelbrot shift: keeps rank 1 from taking >10 % of all traffic
NOMINAL_DAILY_IMPRESSIONS = 100_000  # traffic assumed by the rolling 7d/30d features
UNIVERSE_TAG, CAL_TAG, DAY_TAG, DAYFEAT_TAG = 0x756E6976, 0x63616C69, 0xFFFFFFF0, 0xFFFFFFF1
SELECTION_TAG = 0x73656C65   # own stream: turning `selection` on moves none of the other draws
REF_DATE = date(2026, 11, 1)  # calibration day and item-age reference (a constant, not cfg.start)

# Target marginal rates (BENCHMARKS.md): click 5 %, conversion 10 % of clicks, collect and cart
# 2 % of impressions = 40 % of clicks; mean dwell of a click (our choice) 30 s.
TARGET_CLICK, TARGET_CVR, TARGET_COLLECT, TARGET_CART, TARGET_STAY = 0.05, 0.10, 0.40, 0.40, 30.0
STAY_SIGMA = 0.7             # log-normal spread of dwell around its mean

_S, _I64, _F64 = pa.string(), pa.int64(), pa.float64()
SCHEMA = pa.schema([
    ("request_id", _S), ("ts", pa.timestamp("us")),
    ("user_id", _I64), ("user_gender", _S), ("user_age_bucket", _S), ("user_level", _S),
    ("user_segment", _S), ("user_province", _S),
    ("item_id", _I64), ("category_id", _I64), ("brand_id", _I64), ("shop_id", _I64),
    ("item_type", _S), ("seller_level", _S), ("item_origin", _S), ("item_style", _S),
    ("item_price_band", _S),
    ("device", _S), ("os_version", _S), ("app_version", _S), ("network", _S), ("city", _S),
    ("hour_of_day", _S), ("day_of_week", _S), ("scene", _S), ("position", pa.int16()),
    ("query_topic", _S), ("ad_source", _S),
    ("user_recent_categories", pa.list_(_S)), ("item_tags", pa.list_(_S)),
    ("price", _F64), ("item_age_days", _F64), ("item_ctr_7d", _F64), ("user_orders_30d", _F64),
    ("user_clicks_30d", _F64), ("item_sales_30d", _F64), ("shop_rating", _F64), ("discount_rate", _F64),
    ("click", pa.int8()), ("conversion", pa.int8()), ("stay_seconds", pa.float32()),
    ("collect", pa.int8()), ("cart", pa.int8()),
    ("true_p_click", _F64), ("true_p_conversion", _F64), ("true_p_collect", _F64),
    ("true_p_cart", _F64), ("true_stay_seconds", _F64),
])


@dataclass(frozen=True)
class ImpressionConfig:
    seed: int = 0
    start: date = date(2026, 11, 1)
    days: int = 7
    rows_per_day: int = 100_000
    n_users: int = 1_000_000
    n_items: int = 500_000
    n_categories: int = 2_000
    n_brands: int = 50_000
    n_shops: int = 100_000
    zipf_a: float = 1.1            # popularity exponent for users/items
    task_correlation: float = 0.8  # rho: cosine between w_click and each post-click task direction
    popularity_drift: float = 0.0  # fraction of item popularity ranks re-drawn per day (0 = stationary)
    selection: float = 0.0         # sd of a per-query-topic intent in the click and conversion logits (0 = off)
    rows_per_file: int = 1_000_000
    row_group_size: int = 65_536

    def __post_init__(self) -> None:
        # CLI / YAML callers may pass "2026-11-01" or a datetime; keep a plain date.
        start = date.fromisoformat(self.start) if isinstance(self.start, str) else self.start
        if not isinstance(start, date):
            raise TypeError(f"ImpressionConfig.start must be a date or 'YYYY-MM-DD', got {self.start!r}")
        object.__setattr__(self, "start", date(start.year, start.month, start.day))

    def validate(self) -> None:
        for name in ("days", "rows_per_day", "n_users", "n_items", "n_categories", "n_brands", "n_shops",
                     "rows_per_file", "row_group_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"ImpressionConfig.{name} must be >= 1, got {getattr(self, name)!r}")
        if not 0.0 <= self.task_correlation <= 1.0:
            raise ValueError(f"ImpressionConfig.task_correlation must be in [0, 1], got {self.task_correlation!r}")
        if not 0.0 <= self.popularity_drift <= 1.0:
            raise ValueError(f"ImpressionConfig.popularity_drift must be in [0, 1], got {self.popularity_drift!r}")
        if self.zipf_a <= 0:
            raise ValueError(f"ImpressionConfig.zipf_a must be > 0, got {self.zipf_a!r}")
        if not 0.0 <= self.selection <= 10.0:
            raise ValueError(f"ImpressionConfig.selection must be in [0, 10], got {self.selection!r}")


class WriteRate:
    """For summaries of generated data (dataclasses with `rows` and `seconds`)."""

    @property
    def rows_per_second(self) -> float:
        return self.rows / max(self.seconds, 1e-9)

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "rows_per_second": self.rows_per_second}


@dataclass
class GenerationSummary(WriteRate):
    """What `generate_impressions` wrote, with the measured label rates (for logs and the CLI)."""
    out_dir: str
    rows_per_day: dict[str, int] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    rows: int = 0
    clicks: int = 0
    click_rate: float = 0.0
    cvr_given_click: float = 0.0
    collect_rate: float = 0.0          # of impressions
    cart_rate: float = 0.0             # of impressions
    collect_given_click: float = 0.0
    cart_given_click: float = 0.0
    mean_stay_given_click: float = 0.0
    seconds: float = 0.0


# --------------------------------------------------------------------------- vocabularies

_DEVICES = ["android", "ios", "harmony", "ipad", "pc"]
_NETWORKS = ["wifi", "5g", "4g", "3g", "unknown"]
_WEEKDAYS = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
_SCENES = ["home_feed", "search", "detail_related", "cart_page", "order_done", "channel_sale",
           "channel_new", "live", "video_feed", "shop_page", "coupon_center", "message", "push",
           "mini_game", "external"]


@lru_cache(maxsize=None)
def _vocab(name: str) -> pa.Array:
    """String values of each categorical column, indexed by small ints (built once)."""
    values = {
        "gender": ["female", "male", "unknown"],
        "age": ["<18", "18-24", "25-29", "30-34", "35-44", "45-54", "55+"],
        "level": [f"lv{i}" for i in range(10)],
        "segment": [f"seg{i:03d}" for i in range(200)],
        "province": [f"prov{i:02d}" for i in range(34)],
        "item_type": [f"type{i:02d}" for i in range(20)],
        "seller_level": [f"seller{i}" for i in range(10)],
        "origin": [f"origin{i:03d}" for i in range(300)],
        "style": [f"style{i:04d}" for i in range(1000)],
        "price_band": [f"pb{i:02d}" for i in range(20)],
        "device": _DEVICES,
        "os": [f"{_DEVICES[i // 12]}-{10 + i % 12}" for i in range(60)],
        "app": [f"8.{i // 20}.{i % 20}" for i in range(200)],
        "network": _NETWORKS,
        "city": [f"city{i:03d}" for i in range(400)],
        "hour": [f"{h:02d}" for h in range(24)],
        "weekday": _WEEKDAYS,
        "scene": _SCENES,
        "query": [f"q{i:05d}" for i in range(10_000)],
        "ad_source": [f"src{i:02d}" for i in range(30)],
        "tag": [f"t{i}" for i in range(5_000)],
    }[name]
    return pa.array(values, type=pa.string())


def _take(vocab: str, idx: np.ndarray) -> pa.Array:
    return _vocab(vocab).take(pa.array(idx, type=pa.int32()))


# --------------------------------------------------------------------------- helpers

class _Zipf:
    """Zipf-Mandelbrot law over ranks 1..n, weight (rank+offset)^-a, sampled by inverse CDF.

    Draws equal searchsorted(cdf, U, 'right') but are cheaper: a guide table (first index with
    cdf > k/K) narrows each U to a few candidates, then a short vectorised bisection finishes.
    Bounded, unlike np.random.zipf.
    """

    def __init__(self, n: int, a: float, offset: float):
        c = np.cumsum((np.arange(1, n + 1, dtype=np.float64) + offset) ** -a)
        self.cdf = c / c[-1]
        self.pmf = np.diff(self.cdf, prepend=0.0)
        k = 2 * n
        self.guide = np.minimum(np.searchsorted(self.cdf, np.arange(k + 1) / k, side="right"), n - 1)
        self.k = k

    def draw(self, rng: np.random.Generator, size) -> np.ndarray:
        u = rng.random(size)
        shape, u = u.shape, u.ravel()
        b = (u * self.k).astype(np.int64)
        lo, hi = self.guide[b], self.guide[b + 1]   # answer in [lo, hi]
        act = np.flatnonzero(hi > lo)
        while len(act):
            la, ha, ua = lo[act], hi[act], u[act]
            mid = (la + ha) >> 1
            go = self.cdf[mid] <= ua
            lo[act] = np.where(go, mid + 1, la)
            hi[act] = np.where(go, ha, mid)
            act = act[lo[act] < hi[act]]
        return lo.reshape(shape)


@lru_cache(maxsize=32)
def _zipf(n: int, a: float, offset: float = ZIPF_OFFSET) -> _Zipf:
    return _Zipf(n, a, offset)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _splitmix(x: np.ndarray) -> np.ndarray:
    """Counter-based hash (SplitMix64 finaliser): stateless per-(item, epoch) randomness."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _solve_bias(s: np.ndarray, target: float, weight: np.ndarray | None = None) -> float:
    """Bias b with weighted mean sigmoid(b + s) == target (Newton, monotone in b)."""
    w = np.ones_like(s) if weight is None else weight
    w = w / w.sum()
    b = float(np.log(target / (1 - target)) - np.dot(w, s))
    for _ in range(50):
        p = _sigmoid(b + s)
        f, g = float(np.dot(w, p)) - target, float(np.dot(w, p * (1 - p)))
        b -= float(np.clip(f / max(g, 1e-12), -2.0, 2.0))
        if abs(f) < 1e-9:
            break
    return b


# Diurnal traffic: low at night, peaks at breakfast, lunch and evening. Inverse CDF maps the
# fraction of the day's rows already written to a time, so timestamps rise with row order.
_MINUTES = np.arange(24 * 60 + 1, dtype=np.float64)
_h = _MINUTES[:-1] / 60 + 1 / 120
_dens = (0.15 + 0.5 * np.exp(-((_h - 8.5) / 1.5) ** 2) + 0.8 * np.exp(-((_h - 12.5) / 1.8) ** 2)
         + 1.0 * np.exp(-((_h - 21.0) / 2.0) ** 2))
_DIURNAL_CDF = np.concatenate([[0.0], np.cumsum(_dens)]) / _dens.sum()


# --------------------------------------------------------------------------- universe

class _Universe:
    """Fixed per-user / per-item attributes, latent factors and label-model weights."""

    def __init__(self, cfg: ImpressionConfig):
        rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 0, UNIVERSE_TAG]))
        nu, ni, nc = cfg.n_users, cfg.n_items, cfg.n_categories
        self.cfg = cfg
        # users: Zipf popularity over a random permutation of ids
        self.user_zipf = _zipf(nu, cfg.zipf_a)
        self.user_by_rank = rng.permutation(nu)
        self.user_gender = rng.choice(3, nu, p=[0.48, 0.47, 0.05]).astype(np.int8)
        self.user_age = rng.choice(7, nu, p=[0.05, 0.22, 0.24, 0.2, 0.17, 0.08, 0.04]).astype(np.int8)
        self.user_level = np.minimum(rng.geometric(0.35, nu) - 1, 9).astype(np.int8)
        seg = _zipf(200, 0.8, 1.0).draw(rng, nu).astype(np.int16)
        self.user_segment = seg
        city_prov = rng.permutation(np.concatenate([np.arange(34), rng.integers(0, 34, 400 - 34)]))
        self.user_city = _zipf(400, 1.0, 2.0).draw(rng, nu).astype(np.int16)
        self.user_province = city_prov[self.user_city].astype(np.int8)
        self.user_device = rng.choice(5, nu, p=[0.55, 0.3, 0.1, 0.03, 0.02]).astype(np.int8)
        seg_lat = rng.standard_normal((200, DIM), dtype=np.float32)
        self.user_lat = 0.6 * seg_lat[seg] + 0.8 * rng.standard_normal((nu, DIM), dtype=np.float32)
        self.user_activity = rng.normal(0, 0.35, nu).astype(np.float32)   # clicks more / less
        self.user_buy = rng.normal(0, 0.5, nu).astype(np.float32)        # converts / carts more
        self.user_collect = rng.normal(0, 0.4, nu).astype(np.float32)
        # categories
        self.cat_zipf = _zipf(nc, 1.0, 2.0)
        self.cat_by_rank = rng.permutation(nc)
        cat_lat = rng.standard_normal((nc, DIM), dtype=np.float32)
        self.cat_logprice = rng.normal(np.log(60.0), 0.8, nc)
        self.cat_click = rng.normal(0, 0.2, nc)
        self.user_prefs = self.cat_by_rank[self.cat_zipf.draw(rng, (nu, 3))].astype(np.int32)
        # shops
        self.shop_seller = np.minimum(rng.geometric(0.3, cfg.n_shops) - 1, 9).astype(np.int8)
        self.shop_rating = np.round(np.clip(4.85 - rng.gamma(1.2, 0.3, cfg.n_shops), 0, 5), 1)
        # items
        self.item_phase = rng.random(ni)                       # drift epoch phase
        self.item_salt = int(rng.integers(0, 2**63))
        self.item_zipf = _zipf(ni, cfg.zipf_a)
        cat = self.cat_by_rank[self.cat_zipf.draw(rng, ni)].astype(np.int32)
        self.item_cat = cat
        self.item_brand = rng.permutation(cfg.n_brands)[_zipf(cfg.n_brands, 1.0).draw(rng, ni)]
        self.item_shop = rng.permutation(cfg.n_shops)[_zipf(cfg.n_shops, 1.0).draw(rng, ni)]
        self.item_type = _zipf(20, 1.0, 1.0).draw(rng, ni).astype(np.int8)
        self.item_origin = _zipf(300, 1.0, 1.0).draw(rng, ni).astype(np.int16)
        self.item_style = _zipf(1000, 0.9, 1.0).draw(rng, ni).astype(np.int16)
        self.item_lat = 0.7 * cat_lat[cat] + 0.7 * rng.standard_normal((ni, DIM), dtype=np.float32)
        self.item_quality = rng.normal(0, 0.5, ni)
        logp = self.cat_logprice[cat] + rng.normal(0, 0.5, ni)
        self.item_price = np.round(np.exp(logp), 2).clip(0.01)
        self.item_relprice = np.log(self.item_price) - self.cat_logprice[cat]   # price vs category norm
        edges = np.quantile(logp, np.linspace(0, 1, 21)[1:-1])
        self.item_band = np.searchsorted(edges, logp).astype(np.int8)
        self.item_launch = REF_DATE.toordinal() - np.round(rng.exponential(180.0, ni))
        # items grouped by category, for personalised candidates
        self.cat_items = np.argsort(cat, kind="stable")
        self.cat_count = np.bincount(cat, minlength=nc)
        self.cat_start = np.cumsum(self.cat_count) - self.cat_count
        # item tags: fixed per item, avg length 3, first tag often tied to the category
        n_tags = rng.poisson(3.0, ni)
        off = np.concatenate([[0], np.cumsum(n_tags)])
        tags = _zipf(5000, 1.0, 5.0).draw(rng, int(off[-1]))
        first = off[:-1][n_tags > 0]
        tied = rng.random(len(first)) < 0.6
        tags[first[tied]] = (cat[n_tags > 0][tied] * 7 + 13) % 5000
        self.tag_len, self.tag_start, self.tag_values = n_tags, off[:-1], tags
        # context effects on click
        self.scene_eff = rng.normal(0, 0.25, len(_SCENES))
        self.device_eff = rng.normal(0, 0.1, 5)
        self.seller_eff = np.linspace(-0.3, 0.3, 10)
        self.type_stay = rng.normal(0, 0.35, 20)
        self.style_collect = rng.normal(0, 0.3, 1000)
        # task directions: w_click, and w_t = rho*w_click + sqrt(1-rho^2)*w_t_perp (orthonormal)
        basis, _ = np.linalg.qr(rng.standard_normal((DIM, DIM)))
        rho = cfg.task_correlation
        w = [basis[:, 0]] + [rho * basis[:, 0] + np.sqrt(1 - rho**2) * basis[:, k] for k in (1, 2, 3, 4)]
        self.task_dirs = np.stack(w, axis=1)  # [DIM, 5]: click, conversion, collect, cart, stay
        self.task_dirs_t = np.ascontiguousarray(self.task_dirs.T, dtype=np.float32)
        # sample selection on an observed feature (off by default): purchase intent per query topic
        self.topic_intent = None
        if cfg.selection > 0:
            srng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 0, SELECTION_TAG]))
            self.topic_intent = cfg.selection * srng.standard_normal(len(_vocab("query")))
        self._calibrate(cfg)

    def _calibrate(self, cfg: ImpressionConfig) -> None:
        """Fit the task biases on a fixed sample so marginal rates hit the targets for any knobs."""
        rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 0, CAL_TAG]))
        base = _day_base(self, REF_DATE)
        core = _sample_core(self, base, rng, 8192, 0, 8192 * 30)
        s = _logits(self, core, base)
        s[0] -= _weekday_eff(REF_DATE)   # calibrate for an average day of the week
        self.b_click = _solve_bias(s[0], TARGET_CLICK)
        pc_ = _sigmoid(self.b_click + s[0])
        self.b_conv = _solve_bias(s[1], TARGET_CVR, pc_)
        self.b_collect = _solve_bias(s[2], TARGET_COLLECT, pc_)
        self.b_cart = _solve_bias(s[3], TARGET_CART, pc_)
        self.stay_scale = TARGET_STAY * pc_.sum() / float(np.dot(pc_, np.exp(s[4])))
        # what an item's CTR looks like on average, for the noisy item_ctr_7d feature
        item_part = self.item_quality[core["item"]] + self.cat_click[self.item_cat[core["item"]]]
        self.ctr_offset = float(np.mean(s[0] - item_part))


# --------------------------------------------------------------------------- per day

def _day_base(u: _Universe, day: date) -> dict:
    """Popularity order and discounts of one day (they move the labels)."""
    cfg, ni = u.cfg, u.cfg.n_items
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, day.toordinal(), DAY_TAG]))
    # Each item re-draws its popularity score once every 1/drift days (its own phase), so a
    # fraction `drift` of items moves per day, and day d needs no earlier day to be computed.
    # Better items tend to rank higher, so popularity (and sales) carry some quality signal.
    epoch = np.floor(day.toordinal() * cfg.popularity_drift + u.item_phase).astype(np.uint64)
    ids = np.arange(ni, dtype=np.uint64) ^ np.uint64(u.item_salt)
    h = _splitmix(_splitmix(ids) ^ (epoch * np.uint64(0xD1B54A32D192ED03)))
    unif = ((h >> np.uint64(11)).astype(np.float64) + 0.5) / 2.0**53
    order = np.argsort(-(np.log(unif / (1 - unif)) + 2.0 * u.item_quality), kind="stable")
    prob = np.empty(ni)
    prob[order] = u.item_zipf.pmf
    discount = np.where(rng.random(ni) < 0.35, np.round(rng.beta(2.0, 5.0, ni), 2), 0.0)
    return {"date": day, "item_by_rank": order, "item_prob": prob, "discount": discount}


def _day_features(u: _Universe, base: dict) -> dict:
    """Rolling numeric features of one day: noisy observations of the hidden propensities."""
    cfg, day = u.cfg, base["date"]
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, day.toordinal(), DAYFEAT_TAG]))
    p_item = _sigmoid(u.b_click + u.ctr_offset + u.item_quality + u.cat_click[u.item_cat])
    n7 = np.minimum(50 + np.round(7 * NOMINAL_DAILY_IMPRESSIONS * base["item_prob"]), 1e8).astype(np.int64)
    ctr7 = rng.binomial(n7, p_item) / n7
    lam = 30 * NOMINAL_DAILY_IMPRESSIONS * base["item_prob"] * p_item * TARGET_CVR * np.exp(0.5 * u.item_quality)
    return {
        "item_ctr_7d": np.round(ctr7, 6),
        "item_sales_30d": rng.poisson(lam).astype(np.float64),
        "user_orders_30d": rng.poisson(1.5 * np.exp(u.user_buy)).astype(np.float64),
        "user_clicks_30d": rng.poisson(15.0 * np.exp(u.user_activity)).astype(np.float64),
    }


# --------------------------------------------------------------------------- chunks

def _sample_core(u: _Universe, base: dict, rng: np.random.Generator, n_req: int,
                 row_offset: int, rows_per_day: int, sizes: np.ndarray | None = None) -> dict:
    """Requests, users, context and candidate items of one chunk (integer indices only).

    `sizes`: items per request; None draws 10..50 per request (impression logs)."""
    cfg = u.cfg
    sizes = rng.integers(10, 51, n_req) if sizes is None else np.asarray(sizes, np.int64)
    n = int(sizes.sum())
    req = np.repeat(np.arange(n_req), sizes)
    starts = np.cumsum(sizes) - sizes
    position = np.arange(n) - starts[req]
    frac = np.minimum((row_offset + starts + sizes / 2) / rows_per_day, 1.0 - 1e-9)
    minute = np.interp(frac, _DIURNAL_CDF, _MINUTES)
    user = u.user_by_rank[u.user_zipf.draw(rng, n_req)]
    device = np.where(rng.random(n_req) < 0.85, u.user_device[user], rng.integers(0, 5, n_req))
    os_ = device * 12 + _zipf(12, 1.0, 1.0).draw(rng, n_req)
    city = np.where(rng.random(n_req) < 0.8, u.user_city[user], _zipf(400, 1.0, 2.0).draw(rng, n_req))
    # candidates: 70 % from global popularity, 30 % from one of the user's preferred categories
    ni = cfg.n_items
    item = base["item_by_rank"][u.item_zipf.draw(rng, n)]
    pref_cat = u.user_prefs[user[req], rng.integers(0, 3, n)]
    cnt = u.cat_count[pref_cat]
    personal = (rng.random(n) < 0.3) & (cnt > 0)
    pick = u.cat_start[pref_cat] + np.floor(rng.random(n) * cnt).astype(np.int64)
    item[personal] = u.cat_items[pick[personal]]
    for _ in range(3):  # no item twice in one request (re-draw duplicates a few times)
        key = req.astype(np.int64) * ni + item
        o = np.argsort(key, kind="stable")
        dup = np.zeros(n, bool)
        dup[o[1:]] = key[o[1:]] == key[o[:-1]]
        if not dup.any():
            break
        item[dup] = base["item_by_rank"][u.item_zipf.draw(rng, int(dup.sum()))]
    return {
        "n_req": n_req, "sizes": sizes, "req": req, "position": position, "minute": minute,
        "hour": np.minimum(minute // 60, 23).astype(np.int64), "user": user, "device": device,
        "os": os_, "city": city,
        "app": _zipf(200, 1.2, 2.0).draw(rng, n_req),
        "network": rng.choice(5, n_req, p=[0.6, 0.2, 0.15, 0.03, 0.02]),
        "scene": rng.choice(len(_SCENES), n_req, p=_scene_p()),
        "query": _zipf(10_000, 1.0, 5.0).draw(rng, n_req),
        "ad_source": _zipf(30, 1.0, 1.0).draw(rng, n),
        "item": item,
    }


@lru_cache(maxsize=None)
def _scene_p() -> np.ndarray:
    p = 1.0 / (np.arange(len(_SCENES)) + 1.5)
    return p / p.sum()


def _weekday_eff(day: date) -> float:
    """Weekends click a little more; zero on average over a week."""
    return 0.1 * ((day.weekday() >= 5) - 2 / 7)


def _logits(u: _Universe, c: dict, base: dict) -> np.ndarray:
    """Ground-truth logits without biases, task-major [5, n]: click, conversion, collect, cart, log-stay."""
    req, item = c["req"], c["item"]
    user = c["user"][req]
    z = u.user_lat[user] * u.item_lat[item]                  # user x item interaction
    proj = (u.task_dirs_t @ z.T).astype(np.float64)           # [5, n]; this order is ~50x faster than z @ W
    cat = u.item_cat[item]
    prefs = u.user_prefs[user]
    pref = (prefs[:, 0] == cat) | (prefs[:, 1] == cat) | (prefs[:, 2] == cat)
    q, rel, disc = u.item_quality[item], u.item_relprice[item], base["discount"][item]
    hour = c["hour"][req]
    rating = u.shop_rating[u.item_shop[item]]
    out = np.empty((5, len(item)))
    out[0] = (0.7 * proj[0] + q + u.cat_click[cat] + 0.6 * pref - 0.3 * np.log1p(c["position"])
              + u.scene_eff[c["scene"]][req] + u.device_eff[c["device"]][req]
              + 0.15 * np.cos(2 * np.pi * (hour - 21) / 24) + _weekday_eff(base["date"])
              + u.user_activity[user] + 0.6 * disc - 0.15 * rel)
    out[1] = (0.8 * proj[1] + 0.3 * q - 0.6 * rel + u.user_buy[user] + 0.5 * (rating - 4.5)
              + u.seller_eff[u.shop_seller[u.item_shop[item]]] + 0.3 * pref)
    out[2] = 0.8 * proj[2] + 0.3 * q + u.user_collect[user] + u.style_collect[u.item_style[item]] + 0.4 * pref
    out[3] = 0.8 * proj[3] + 0.3 * q + 1.2 * disc + 0.6 * u.user_buy[user] - 0.2 * rel
    out[4] = 0.25 * proj[4] + 0.15 * q + u.type_stay[u.item_type[item]]
    if u.topic_intent is not None:   # intent raises clicks and purchases alike: selection on query_topic
        intent = u.topic_intent[c["query"]][req]
        out[0] += intent
        out[1] += intent
    return out


@lru_cache(maxsize=4)
def _cat_strings(n: int) -> pa.Array:
    """Decimal strings of category ids, so "123" hashes like the int64 category_id 123."""
    return pa.array(np.arange(n, dtype=np.int64)).cast(pa.string())


def _row_lists(lens: np.ndarray, starts: np.ndarray, values: np.ndarray, owner: np.ndarray,
               vocab: pa.Array) -> pa.Array:
    """list<string> per row from CSR lists indexed by `owner` (cheaper than ListArray.take)."""
    n_row = lens[owner]
    off = np.zeros(len(owner) + 1, np.int64)
    np.cumsum(n_row, out=off[1:])
    flat = np.repeat(starts[owner] - off[:-1], n_row) + np.arange(off[-1])
    return pa.ListArray.from_arrays(pa.array(off.astype(np.int32)), vocab.take(pa.array(values[flat], pa.int32())))


def _chunk_table(u: _Universe, base: dict, feats: dict, rng: np.random.Generator, c: dict,
                 first_request: int, request_prefix: str = "r") -> pa.Table:
    """Labels + every column of one chunk as an Arrow table in SCHEMA order."""
    day = base["date"]
    s = _logits(u, c, base)
    n, req, item = len(c["item"]), c["req"], c["item"]
    user = c["user"][req]
    p_click = _sigmoid(u.b_click + s[0])
    p_conv, p_coll, p_cart = (_sigmoid(b + s[k]) for k, b in ((1, u.b_conv), (2, u.b_collect), (3, u.b_cart)))
    stay_mean = u.stay_scale * np.exp(s[4])
    r = rng.random((4, n))
    click = r[0] < p_click
    conv, coll, cart = click & (r[1] < p_conv), click & (r[2] < p_coll), click & (r[3] < p_cart)
    stay = np.where(click, stay_mean * np.exp(STAY_SIGMA * rng.standard_normal(n) - STAY_SIGMA**2 / 2), 0.0)
    # multi-hot recent categories per request: mostly the user's preferred categories
    n_rec = rng.poisson(5.0, c["n_req"])
    off = np.concatenate([[0], np.cumsum(n_rec)])
    owner = np.repeat(c["user"], n_rec)
    rec = np.where(rng.random(int(off[-1])) < 0.8, u.user_prefs[owner, rng.integers(0, 3, len(owner))],
                   u.cat_by_rank[u.cat_zipf.draw(rng, len(owner))])
    recent = _row_lists(n_rec, off[:-1], rec, req, _cat_strings(u.cfg.n_categories))
    # ids and time
    rid = pc.utf8_lpad(pa.array(first_request + np.arange(c["n_req"]), pa.int64()).cast(pa.string()), 9, "0")
    rid = pc.binary_join_element_wise(f"{request_prefix}{day:%Y%m%d}-", rid, "")
    day_us = (day.toordinal() - date(1970, 1, 1).toordinal()) * 86_400_000_000
    ts = day_us + np.round(c["minute"] * 60e6).astype(np.int64).clip(0, 86_400_000_000 - 1)
    ridx = pa.array(req, pa.int32())
    shop = u.item_shop[item]
    cols = {
        "request_id": rid.take(ridx),
        "ts": pa.array(ts[req], pa.timestamp("us")),
        "user_id": pa.array(user, pa.int64()),
        "user_gender": _take("gender", u.user_gender[user]),
        "user_age_bucket": _take("age", u.user_age[user]),
        "user_level": _take("level", u.user_level[user]),
        "user_segment": _take("segment", u.user_segment[user]),
        "user_province": _take("province", u.user_province[user]),
        "item_id": pa.array(item, pa.int64()),
        "category_id": pa.array(u.item_cat[item], pa.int64()),
        "brand_id": pa.array(u.item_brand[item], pa.int64()),
        "shop_id": pa.array(shop, pa.int64()),
        "item_type": _take("item_type", u.item_type[item]),
        "seller_level": _take("seller_level", u.shop_seller[shop]),
        "item_origin": _take("origin", u.item_origin[item]),
        "item_style": _take("style", u.item_style[item]),
        "item_price_band": _take("price_band", u.item_band[item]),
        "device": _take("device", c["device"][req]),
        "os_version": _take("os", c["os"][req]),
        "app_version": _take("app", c["app"][req]),
        "network": _take("network", c["network"][req]),
        "city": _take("city", c["city"][req]),
        "hour_of_day": _take("hour", c["hour"][req]),
        "day_of_week": _take("weekday", np.full(n, day.weekday())),
        "scene": _take("scene", c["scene"][req]),
        "position": pa.array(c["position"].astype(np.int16)),
        "query_topic": _take("query", c["query"][req]),
        "ad_source": _take("ad_source", c["ad_source"]),
        "user_recent_categories": recent,
        "item_tags": _row_lists(u.tag_len, u.tag_start, u.tag_values, item, _vocab("tag")),
        "price": pa.array(u.item_price[item]),
        "item_age_days": pa.array(np.maximum(day.toordinal() - u.item_launch[item], 0.0)),
        "item_ctr_7d": pa.array(feats["item_ctr_7d"][item]),
        "user_orders_30d": pa.array(feats["user_orders_30d"][user]),
        "user_clicks_30d": pa.array(feats["user_clicks_30d"][user]),
        "item_sales_30d": pa.array(feats["item_sales_30d"][item]),
        "shop_rating": pa.array(u.shop_rating[shop]),
        "discount_rate": pa.array(base["discount"][item]),
        "click": pa.array(click.astype(np.int8)),
        "conversion": pa.array(conv.astype(np.int8)),
        "stay_seconds": pa.array(stay.astype(np.float32)),
        "collect": pa.array(coll.astype(np.int8)),
        "cart": pa.array(cart.astype(np.int8)),
        "true_p_click": pa.array(p_click),
        "true_p_conversion": pa.array(p_conv),
        "true_p_collect": pa.array(p_coll),
        "true_p_cart": pa.array(p_cart),
        "true_stay_seconds": pa.array(stay_mean),
    }
    return pa.Table.from_arrays(list(cols.values()), schema=SCHEMA)


# --------------------------------------------------------------------------- writing

# Dictionary-encode only where values repeat; float/id columns would only pay for a failed attempt.
_DICT_COLUMNS = [f.name for f in SCHEMA if f.type in (pa.string(), pa.list_(pa.string()), pa.int8(), pa.int16())
                 and f.name != "request_id"] + ["category_id", "brand_id", "shop_id", "shop_rating", "discount_rate"]


class _DayWriter:
    """Streams tables into part-NNNNN.parquet files of `rows_per_file` rows, in full row groups."""

    def __init__(self, directory: Path, rows_per_file: int, row_group_size: int, schema: pa.Schema = SCHEMA):
        self.dir, self.rows_per_file, self.rg, self.schema = directory, rows_per_file, row_group_size, schema
        self._dict_columns = [c for c in _DICT_COLUMNS if c in schema.names]
        self.files: list[Path] = []
        self._writer: pq.ParquetWriter | None = None
        self._pending: list[pa.Table] = []
        self._pending_rows = self._file_rows = 0

    def write(self, table: pa.Table) -> None:
        while table.num_rows:
            part = table.slice(0, self.rows_per_file - self._file_rows)
            table = table.slice(part.num_rows)
            self._pending.append(part)
            self._pending_rows += part.num_rows
            self._file_rows += part.num_rows
            while self._pending_rows >= self.rg:
                self._flush(self.rg)
            if self._file_rows == self.rows_per_file:
                self._close_file()

    def _flush(self, n: int) -> None:
        buf = pa.concat_tables(self._pending)
        if self._writer is None:
            path = self.dir / f"part-{len(self.files):05d}.parquet"
            self.files.append(path)
            self._writer = pq.ParquetWriter(path, self.schema, compression="snappy",
                                            use_dictionary=self._dict_columns,
                                            write_page_checksum=True)  # readers verify: corruption is an error
        self._writer.write_table(buf.slice(0, n), row_group_size=n)
        rest = buf.slice(n)
        self._pending, self._pending_rows = ([rest] if rest.num_rows else []), rest.num_rows

    def _close_file(self) -> None:
        if self._pending_rows:
            self._flush(self._pending_rows)
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self._file_rows = 0

    def close(self) -> list[Path]:
        self._close_file()
        return self.files


def _write_day(u: _Universe, day: date, directory: Path, pool: ThreadPoolExecutor,
               bar: Progress, counts: np.ndarray) -> list[Path]:
    """Generate one day chunk by chunk; Parquet encoding of chunk k overlaps generation of k+1."""
    cfg = u.cfg
    base = _day_base(u, day)
    feats = _day_features(u, base)
    writer = _DayWriter(directory, cfg.rows_per_file, cfg.row_group_size)
    written, chunk, pending = 0, 0, None
    while written < cfg.rows_per_day:
        rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, day.toordinal(), chunk]))
        core = _sample_core(u, base, rng, CHUNK_REQUESTS, written, cfg.rows_per_day)
        table = _chunk_table(u, base, feats, rng, core, chunk * CHUNK_REQUESTS)
        table = table.slice(0, cfg.rows_per_day - written)
        counts += [table.num_rows] + [pc.sum(table[k]).as_py() or 0 for k in _COUNTED]
        if pending is not None:
            pending.result()
        pending = pool.submit(writer.write, table)
        written += table.num_rows
        chunk += 1
        bar.update(table.num_rows, day=f"{day:%Y-%m-%d}")
    pending.result()
    return writer.close()


_COUNTED = ("click", "conversion", "collect", "cart", "stay_seconds")


def _swap_in_day(out: Path, day: date, write) -> list[Path]:
    """Run `write(tmp_dir) -> files` in a hidden temporary folder, then swap it in as dt=DAY.

    A rerun replaces the day atomically and readers never see half a day (pyarrow skips names
    starting with '.'). Returns the final paths of the files written."""
    final = out / f"dt={day:%Y-%m-%d}"
    tmp = out / f".dt={day:%Y-%m-%d}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        files = write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    return [final / f.name for f in files]


def generate_impressions(out_dir: str | Path, cfg: ImpressionConfig,
                         progress: bool | None = None) -> GenerationSummary:
    """Write `cfg.days` days of logs as out_dir/dt=YYYY-MM-DD/part-NNNNN.parquet.

    Each day is written to a hidden temporary folder and then swapped in, so a rerun replaces a
    day atomically and readers never see half a day (pyarrow skips names starting with '.').
    """
    cfg.validate()
    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    u = _Universe(cfg)
    summary = GenerationSummary(out_dir=str(out))
    counts = np.zeros(1 + len(_COUNTED))   # rows, clicks, conversions, collects, carts, stay sum
    with Progress("generate", total=cfg.days * cfg.rows_per_day, unit="rows", enabled=progress) as bar, \
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="mtrank-parquet") as pool:
        for d in range(cfg.days):
            day = date.fromordinal(cfg.start.toordinal() + d)
            files = _swap_in_day(out, day, lambda tmp: _write_day(u, day, tmp, pool, bar, counts))
            summary.files += [str(f) for f in files]
            summary.rows_per_day[f"{day:%Y-%m-%d}"] = cfg.rows_per_day
    rows, clicks, conv, coll, cart, stay = counts.tolist()
    summary.rows, summary.clicks = int(rows), int(clicks)
    summary.click_rate = clicks / rows
    summary.collect_rate, summary.cart_rate = coll / rows, cart / rows
    per_click = max(clicks, 1)
    summary.cvr_given_click = conv / per_click
    summary.collect_given_click, summary.cart_given_click = coll / per_click, cart / per_click
    summary.mean_stay_given_click = stay / per_click
    summary.seconds = time.perf_counter() - t0
    return summary
