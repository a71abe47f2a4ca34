"""Platt calibration: recovers known parameters, keeps each task's ranking, travels in the weights."""
from __future__ import annotations

import numpy as np
import torch

from mtrank.models import ModelConfig
from mtrank.pipeline.calibration import fit_calibration, fit_platt, logit
from mtrank.pipeline.trainer import build_model


def test_fit_platt_recovers_the_generating_scale_and_shift():
    rng = np.random.default_rng(0)
    z = rng.normal(0, 1.5, 200_000)
    y = (rng.random(z.size) < 1 / (1 + np.exp(-(0.6 * z - 1.2)))).astype(np.float64)
    a, b = fit_platt(z, y)
    assert abs(a - 0.6) < 0.02 and abs(b + 1.2) < 0.03
    p = 1 / (1 + np.exp(-(a * z + b)))
    assert abs(p.mean() / y.mean() - 1) < 0.01          # calibrated: PCOC ~ 1
    assert fit_platt(z, np.zeros_like(z)) == (1.0, 0.0)   # one class: nothing to fit


def test_the_prior_holds_a_small_split_near_the_identity_and_yields_to_a_large_one():
    rng = np.random.default_rng(3)

    def sample(n):
        z = rng.normal(-2, 1, n)
        return z, (rng.random(n) < 1 / (1 + np.exp(-(z + 0.3)))).astype(np.float64)   # truth: shift +0.3
    z, y = sample(2_000)                                  # ~300 positives: the fit's own noise is ~0.07
    a_free, b_free = fit_platt(z, y)
    a, b = fit_platt(z, y, prior_sd=0.1)
    assert abs(a - 1) < abs(a_free - 1) + 1e-9 and 0 < b < b_free     # pulled toward the identity, same side
    z, y = sample(400_000)                                # ~60k positives: the prior no longer matters
    a, b = fit_platt(z, y, prior_sd=0.1)
    assert abs(a - 1) < 0.02 and abs(b - 0.3) < 0.03
    # the prior's centre moves with a known shift (negative sampling's log keep rate)
    z, y = sample(300)
    a, b = fit_platt(z, y, prior_sd=0.01, prior_shift=-2.0)
    assert abs(a - 1) < 0.02 and abs(b + 2.0) < 0.05
    assert fit_platt(z, np.zeros_like(z), prior_sd=0.1, prior_shift=-2.0) == (1.0, -2.0)


def test_fit_calibration_uses_each_tasks_population(spec):
    rng = np.random.default_rng(1)
    n = 50_000
    outputs, labels, masks = {}, {}, {}
    for t in spec.tasks:
        if t.type != "binary":
            continue
        z = rng.normal(-1, 1, n)
        outputs[spec.outputs.own(t.name).name] = (1 / (1 + np.exp(-z))).astype(np.float32)
        truth = 1 / (1 + np.exp(-(z + 0.5)))               # the model under-predicts by a shift of 0.5
        labels[t.name] = (rng.random(n) < truth).astype(np.float32)
        masks[t.name] = np.ones(n, bool) if t.space is None else rng.random(n) < 0.3
    fitted = fit_calibration(outputs, labels, masks, spec)
    for t, c in fitted.items():
        assert c["fitted"] and abs(c["scale"] - 1) < 0.08 and abs(c["shift"] - 0.5) < 0.08, (t, c)
        assert c["rows"] == int(masks[t].sum())
    assert np.allclose(logit(np.array([0.5])), 0.0)
    # too few positives: no fit, the prior's centre is kept (a negative-sampled task keeps its shift)
    first = next(t for t in fitted)
    few = {k: v.copy() for k, v in labels.items()}
    few[first][:] = 0
    few[first][:5] = 1
    masks_all = {k: np.ones(n, bool) for k in masks}
    kept = fit_calibration(outputs, few, masks_all, spec, prior_sd=0.1, prior_shifts={first: -1.5})
    assert not kept[first]["fitted"] and kept[first]["shift"] == -1.5 and kept[first]["scale"] == 1.0


def test_the_calibration_is_in_the_weights_and_keeps_each_tasks_order(spec):
    model = build_model(spec, ModelConfig(experts=2, expert_mlp=[8], tower_mlp=[4]), 0)
    model.eval()
    raw = torch.randn(len(model.tasks), 64)
    before = model.outputs(raw, None).predictions
    binary = [t.name for t in spec.tasks if t.type == "binary"]
    model.set_calibration({binary[0]: (0.5, -0.3)})
    after = model.outputs(raw, None).predictions
    name = spec.outputs.own(binary[0]).name
    assert not torch.allclose(before[name], after[name])
    assert torch.equal(torch.argsort(before[name]), torch.argsort(after[name]))     # monotone: same ranking
    other = spec.outputs.own(binary[1]).name
    assert torch.equal(before[other], after[other])
    state = model.state_dict()
    assert "calibration" in state
    fresh = build_model(spec, ModelConfig(experts=2, expert_mlp=[8], tower_mlp=[4]), 1)
    fresh.load_state_dict(state)
    assert fresh.calibration_params() == {binary[0]: (0.5, -0.30000001192092896)}
    # weights saved before calibration existed load as uncalibrated
    legacy = {k: v for k, v in state.items() if k != "calibration"}
    fresh.load_state_dict(legacy)
    assert fresh.calibration_params() == {}
