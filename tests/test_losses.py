"""Loss terms from task records: populations, ESMM in log space, uncertainty weighting."""
import math

import pytest
import torch
import torch.nn.functional as F

from mtrank.features.spec import load_spec
from mtrank.models.batch import Batch, ModelOutput
from mtrank.pipeline.losses import MultiTaskLoss, bce_from_log_prob, log1mexp, loss_terms


@pytest.fixture(scope="module")
def spec():
    return load_spec()


def fake(spec, n=64, seed=0):
    """Model outputs and a Batch carrying only what the loss reads (labels, masks)."""
    g = torch.Generator().manual_seed(seed)
    click = (torch.rand(n, generator=g) < 0.4).float()
    labels = {"ctr": click}
    for t in ("cvr", "collect", "cart"):
        labels[t] = click * (torch.rand(n, generator=g) < 0.5).float()
    labels["stay"] = click * torch.rand(n, generator=g) * 60
    masks = {t.name: torch.ones(n, dtype=torch.bool) if t.space == "all" else click > 0 for t in spec.tasks}
    logits = {t.name: torch.randn(n, generator=g, requires_grad=True) for t in spec.tasks}
    log_products = {t.name: F.logsigmoid(logits[t.parent]) + F.logsigmoid(logits[t.name])
                    for t in spec.tasks if t.parent}
    out = ModelOutput(logits, {}, log_products, None)
    batch = Batch(n, torch.zeros(n, 1, dtype=torch.long), {}, torch.zeros(n, 0), labels, masks, None, {})
    return out, batch


def test_terms_follow_task_records(spec):
    esmm = {t.task: t for t in loss_terms(spec, esmm=True)}
    plain = {t.task: t for t in loss_terms(spec, esmm=False)}
    assert esmm["cvr"].kind == "logprob_bce" and esmm["cvr"].population == "ctr"
    assert esmm["cvr"].targets == ("ctr", "cvr")
    assert plain["cvr"].kind == "logit_bce" and plain["cvr"].population == "cvr"
    assert esmm["stay"].kind == "mse_log1p" == plain["stay"].kind
    assert esmm["ctr"] == plain["ctr"]
    assert esmm["stay"].weight == pytest.approx(0.2)


def test_post_click_loss_averages_over_clicked_rows_only(spec):
    out, batch = fake(spec)
    loss = MultiTaskLoss(spec, esmm=False)
    _, per_task, counts = loss(out, batch)
    clicked = batch.masks["cvr"]
    expected = F.binary_cross_entropy_with_logits(out.logits["cvr"][clicked], batch.labels["cvr"][clicked])
    assert per_task["cvr"] == pytest.approx(expected.item(), rel=1e-6)
    assert counts["cvr"] == int(clicked.sum()) and counts["ctr"] == batch.size
    # rows outside the population cannot move the term: change their logits and labels wildly
    out.logits["cvr"].data[~clicked] = 50.0
    batch.labels["cvr"][~clicked] = 1.0
    assert loss(out, batch)[1]["cvr"] == pytest.approx(per_task["cvr"], rel=1e-6)
    stay_target = torch.log1p(batch.labels["stay"][clicked])
    assert per_task["stay"] == pytest.approx(((out.logits["stay"][clicked] - stay_target) ** 2).mean().item(),
                                             rel=1e-6)


def test_esmm_term_is_entire_space_bce_of_product(spec):
    out, batch = fake(spec, seed=1)
    _, per_task, counts = MultiTaskLoss(spec, esmm=True)(out, batch)
    p = torch.sigmoid(out.logits["ctr"]) * torch.sigmoid(out.logits["cvr"])
    y = batch.labels["ctr"] * batch.labels["cvr"]
    assert per_task["cvr"] == pytest.approx(F.binary_cross_entropy(p, y).item(), rel=1e-5)
    assert counts["cvr"] == batch.size  # the parent's population: every impression


def test_empty_population_gives_zero_with_graph(spec):
    out, batch = fake(spec)
    for t in ("cvr", "collect", "cart", "stay"):
        batch.masks[t][:] = False
    total, per_task, counts = MultiTaskLoss(spec, esmm=False)(out, batch)
    assert per_task["cvr"] == 0.0 and counts["cvr"] == 0
    total.backward()
    assert torch.all(out.logits["cvr"].grad == 0)


def test_log_space_bce_is_finite_where_probability_product_is_not():
    z = torch.tensor([60.0, -60.0, 0.0, 20.0])
    lp = F.logsigmoid(z) + F.logsigmoid(z)
    for y in (0.0, 1.0):
        v = bce_from_log_prob(lp, torch.full_like(lp, y))
        assert torch.isfinite(v).all()
    # matches the probability formula where that one is accurate
    z = torch.linspace(-6, 6, 25, dtype=torch.float64)
    lp = F.logsigmoid(z) + F.logsigmoid(z / 2)
    p = torch.exp(lp)
    y = (torch.arange(25) % 2).double()
    ref = -(y * torch.log(p) + (1 - y) * torch.log1p(-p))
    torch.testing.assert_close(bce_from_log_prob(lp, y), ref)
    x = torch.tensor([-1e-10, -0.5, -0.7, -30.0], dtype=torch.float64)
    torch.testing.assert_close(log1mexp(x), torch.log(-torch.expm1(x)))


def test_uncertainty_weighting_learns_log_variances(spec):
    out, batch = fake(spec)
    loss = MultiTaskLoss(spec, esmm=True, weighting="uncertainty")
    fixed = MultiTaskLoss(spec, esmm=True)
    t_u, per_task, _ = loss(out, batch)
    t_f, _, _ = fixed(out, batch)
    assert t_u.item() == pytest.approx(t_f.item() * 1.0 - 0.5 * sum(  # s=0: binary x1, regression x0.5
        t.weight * per_task[t.task] for t in loss.terms if not t.binary), rel=1e-5)
    with torch.no_grad():
        loss.uncertainty.log_vars.fill_(math.log(4.0))
    t4, _, _ = loss(out, batch)
    expected = sum(t.weight * ((1.0 if t.binary else 0.5) * per_task[t.task] / 4 + 0.5 * math.log(4.0))
                   for t in loss.terms)
    assert t4.item() == pytest.approx(expected, rel=1e-5)
    t4.backward()
    assert loss.uncertainty.log_vars.grad is not None and torch.all(loss.uncertainty.log_vars.grad != 0)
