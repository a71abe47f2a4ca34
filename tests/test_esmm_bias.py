"""ESMM's point, reproduced on generated logs (issue 3): under sample selection on an observed
feature, a CVR model trained on clicked rows only is more biased over *all* impressions than
ESMM's pCVR, both judged against the generator's true p(conversion | click) of every row.

The regime is the generator's `selection` knob: each query topic has a purchase intent that raises
clicks and purchases alike, so the clicked rows come mostly from high-intent topics. A low-intent
topic has many impressions but few clicks: ESMM learns its topic from the click signal of every
impression (CTR and CTCVR losses over the entire space), the clicked-only model hardly sees it and
predicts the clicked rows' conversion rate there. Nothing here is hard-coded: both models are
trained and scored, and the truth comes from the generator.
"""
from __future__ import annotations

import dataclasses
from datetime import date, timedelta

import numpy as np
import polars as pl
import pytest
import yaml

from mtrank.features.featurize import Featurizer
from mtrank.features.spec import load_spec, parse_spec
from mtrank.models import ModelConfig
from mtrank.pipeline.dataset import open_window
from mtrank.pipeline.evaluate import predict
from mtrank.pipeline.metrics import auc
from mtrank.pipeline.reader import ImpressionReader, fit_numeric_stats
from mtrank.pipeline.synthetic.impressions import ImpressionConfig, generate_impressions
from mtrank.pipeline.trainer import TrainConfig, Trainer, build_model

pytestmark = pytest.mark.slow   # end-to-end: trains models, starts servers or ranks

START = date(2026, 11, 1)
CFG = ImpressionConfig(seed=11, start=START, days=2, rows_per_day=150_000, n_users=5_000, n_items=2_000,
                       n_categories=100, n_brands=500, n_shops=500, selection=1.5,
                       rows_per_file=150_000, row_group_size=16_384)
MODEL = ModelConfig(experts=4, expert_mlp=(32, 16), tower_mlp=(8,))
TRAIN = TrainConfig(epochs=2, batch_size=1024, shuffle_buffer=16_384, lr=3e-3)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ranks = [np.argsort(np.argsort(x, kind="stable"), kind="stable") for x in (a, b)]
    return float(np.corrcoef(*ranks)[0, 1])


def cvr_only_spec():
    """Every task but cvr weighted 0: with esmm off, the CVR loss on clicked rows alone trains it."""
    raw = yaml.safe_load(load_spec().to_yaml())
    for t in raw["tasks"]:
        if t["name"] != "cvr":
            t["weight"] = 0.0
    return parse_spec(raw, "cvr-only")


@pytest.fixture(scope="module")
def logs(tmp_path_factory):
    root = tmp_path_factory.mktemp("selection-logs")
    generate_impressions(root, CFG, progress=False)
    return root


def train_and_predict(logs, spec, esmm: bool):
    train = open_window(logs, spec, START, START)
    stats = fit_numeric_stats(ImpressionReader(train, spec, progress=False))
    fz = Featurizer(spec, stats)
    model = build_model(spec, MODEL.model_copy(update={"esmm": esmm}), TRAIN.seed, stats)
    reader = ImpressionReader(train, spec, fz, batch_size=TRAIN.batch_size, shuffle=True,
                              shuffle_buffer=TRAIN.shuffle_buffer, seed=TRAIN.seed, progress=False)
    Trainer(model, spec, TRAIN).fit(reader, progress=False)
    day2 = START + timedelta(days=1)
    ev = ImpressionReader(open_window(logs, spec, day2, day2), spec, fz, batch_size=16_384, with_eval=True,
                          progress=False)
    return predict(model, ev)


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


def test_esmm_pcvr_less_biased_than_clicked_only_cvr_over_all_impressions(logs):
    spec = load_spec()
    esmm = train_and_predict(logs, spec, esmm=True)
    plain = train_and_predict(logs, cvr_only_spec(), esmm=False)
    truth = esmm.truth["cvr"].astype(np.float64)
    clicked = esmm.labels["ctr"] > 0
    np.testing.assert_array_equal(truth, plain.truth["cvr"])        # same rows, same order

    def bias(pred, rows):
        return float(pred.outputs["p_cvr"][rows].astype(np.float64).mean() - truth[rows].mean())

    everywhere = np.ones_like(clicked)
    b_esmm, b_plain = bias(esmm, everywhere), bias(plain, everywhere)
    msg = (f"bias over all impressions: ESMM {b_esmm:+.4f}, clicked-only CVR {b_plain:+.4f}; on clicked rows "
           f"{bias(esmm, clicked):+.4f} / {bias(plain, clicked):+.4f}")
    # Generator seeds 1-12 of this config (this one is 11): ESMM +0.004..+0.027, clicked-only
    # +0.021..+0.057; |bias| ratio 0.17-0.67 (0.49 here), difference > 0.007; the Spearman figures
    # below 0.25-0.46 vs 0.02-0.13. With selection=0 (seeds 1, 2, 11) the test fails: ESMM ranks the
    # unclicked rows no better (0.17-0.19 vs 0.18-0.23) and its bias is not reliably smaller.
    # The clicked-only model is not broken: it ranks the clicked rows it was trained on ...
    assert auc(plain.outputs["p_cvr"][clicked], plain.labels["cvr"][clicked]) > 0.55, msg
    # ... but over every impression it predicts about the clicked rows' rate: it over-predicts.
    assert b_plain > 0.01, msg
    # ESMM is less biased, by a margin
    assert abs(b_esmm) < 0.8 * abs(b_plain) and abs(b_plain) - abs(b_esmm) > 0.005, msg
    # Why: ESMM has learnt the topics' intent from the clicks of every impression, so its pCVR ranks
    # the unclicked impressions; the clicked-only model's barely does.
    unclicked = ~clicked
    rho = {k: spearman(p.outputs["p_cvr"][unclicked], truth[unclicked]) for k, p in (("esmm", esmm), ("plain", plain))}
    assert rho["esmm"] > rho["plain"] + 0.15, (rho, msg)
