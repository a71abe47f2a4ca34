"""ESMM's point, reproduced on generated logs (issue 3): under sample selection on an observed
feature, a CVR model trained on clicked rows only is more biased over *all* impressions than
ESMM's pCVR, both judged against the generator's true p(conversion | click) of every row.

The regime is the generator's `selection` knob: each query topic has a purchase intent that raises
clicks and purchases alike, so the clicked rows come mostly from high-intent topics. A low-intent
topic has many impressions but few clicks: ESMM learns its topic from the click signal of every
impression (CTR and CTCVR losses over the entire space), the clicked-only model hardly sees it and
predicts the clicked rows' conversion rate there. Nothing here is hard-coded: both models are
trained and scored, and the truth comes from the generator.

Here: the regime's premise, on the generated logs. The study itself (train ESMM and a clicked-only
CVR model, bias and Spearman against the truth over all impressions) is a slow experiment and lives
in `bench/quality_bench.py` and `bench/esmm_tower_bench.py` (several generator seeds; figures in
bench/README.md), not in `make test`.
"""
from __future__ import annotations

import dataclasses
from datetime import date

import polars as pl
import pytest

from mtrank.pipeline.synthetic.impressions import ImpressionConfig, generate_impressions

START = date(2026, 11, 1)
CFG = ImpressionConfig(seed=11, start=START, days=1, rows_per_day=150_000, n_users=5_000, n_items=2_000,
                       n_categories=100, n_brands=500, n_shops=500, selection=1.5,
                       rows_per_file=150_000, row_group_size=16_384)


@pytest.fixture(scope="module")
def logs(tmp_path_factory):
    root = tmp_path_factory.mktemp("selection-logs")
    generate_impressions(root, CFG, progress=False)
    return root


def test_selection_knob_is_off_by_default_and_validated(tmp_path):
    assert ImpressionConfig().selection == 0.0
    with pytest.raises(ValueError, match="selection"):
        generate_impressions(tmp_path, dataclasses.replace(CFG, selection=-1.0), progress=False)


def test_selection_makes_clicked_rows_unrepresentative(logs):
    """The regime's premise: clicks select high-intent topics, so the true CVR of the clicked rows is
    far above that of all impressions, while the marginal rates stay calibrated."""
    df = pl.read_parquet(logs / "dt=2026-11-01" / "*.parquet")
    clicked = df.filter(pl.col("click") == 1)
    assert 0.04 < df["click"].mean() < 0.06
    assert 0.08 < clicked["conversion"].mean() < 0.13
    assert clicked["true_p_conversion"].mean() > 2.5 * df["true_p_conversion"].mean()
    # selection on an observed feature: the query topic explains most of the click-rate spread
    by_topic = df.group_by("query_topic").agg(pl.col("true_p_click").mean().alias("t"), pl.len().alias("n"))
    assert by_topic.filter(pl.col("n") >= 200)["t"].std() > 0.03
