"""Training loop: learning on generated logs, determinism, NaN guard, checkpoints and resume."""
import datetime as dt
import pickle
import re

import numpy as np
import pytest
import torch

from mtrank.features.featurize import Featurizer
from tests.conftest import capped_spec
from mtrank.models import ModelConfig
from mtrank.pipeline.checkpoint import CheckpointError, CheckpointStore
from mtrank.pipeline.dataset import open_window
from mtrank.pipeline.evaluate import predict, task_metrics
from mtrank.pipeline.optim import RowWiseAdagrad
from mtrank.pipeline.reader import ImpressionReader, fit_numeric_stats
from mtrank.pipeline.synthetic.impressions import ImpressionConfig, generate_impressions
from mtrank.pipeline.trainer import (NonFiniteLossError, ResumeMismatchError, TrainConfig, Trainer, bf16_supported,
                              build_model, setup_differences)

START = dt.date(2026, 11, 1)
SMALL = ModelConfig(experts=4, expert_mlp=(32, 16), tower_mlp=(8,))


@pytest.fixture(scope="module")
def logs(tmp_path_factory):
    root = tmp_path_factory.mktemp("logs")
    cfg = ImpressionConfig(seed=3, start=START, days=4, rows_per_day=30_000, n_users=1_000, n_items=400,
                           n_brands=300, n_shops=500, n_categories=100)
    generate_impressions(root, cfg, progress=False)
    return root


@pytest.fixture(scope="module")
def setup(logs):
    spec = capped_spec()
    train = open_window(logs, spec, START, START + dt.timedelta(days=2))
    stats = fit_numeric_stats(ImpressionReader(train, spec, progress=False))
    return spec, train, stats, Featurizer(spec, stats)


@pytest.fixture(scope="module")
def one_day(setup):
    """The first day alone (30k rows), same spec and statistics: for properties that do not need the
    whole window (determinism, resume, bf16 loss parity, early stopping's bookkeeping)."""
    spec, _, stats, fz = setup
    return spec, open_window(setup[1].root, spec, START, START), stats, fz


def reader(setup, cfg, **kw):
    spec, train, _, fz = setup
    return ImpressionReader(train, spec, fz, batch_size=cfg.batch_size, shuffle=cfg.shuffle,
                            shuffle_buffer=cfg.shuffle_buffer, seed=cfg.seed, progress=False, **kw)


def train(setup, cfg, model_cfg=SMALL, store=None, resume=False, cache=None):
    spec, _, stats, _ = setup
    model = build_model(spec, model_cfg, cfg.seed, stats)
    trainer = Trainer(model, spec, cfg, store)
    result = trainer.fit(reader(setup, cfg, cache=cache() if cache else None), resume=resume, progress=False)
    return model, trainer, result


@pytest.mark.slow
@pytest.mark.parametrize("esmm", [False, True])
def test_training_beats_constant_predictor_on_every_task(setup, logs, esmm):
    """A constant predictor has AUC 0.5 and R^2 <= 0 on every population. Plain towers are judged
    on their own populations; ESMM trains children only through the entire-space products, so
    those are what it must get right (its conditional towers are compared in bench/quality)."""
    spec, _, _, fz = setup
    cfg = TrainConfig(epochs=2, batch_size=1024, shuffle_buffer=16_384, lr=3e-3)
    model, _, result = train(setup, cfg, SMALL.model_copy(update={"esmm": esmm}))
    assert result.rows_trained == 2 * 90_000 and result.accounting.balanced
    assert result.accounting.rows_read == 2 * 90_000
    ev = open_window(logs, spec, START + dt.timedelta(days=3), START + dt.timedelta(days=3))
    m = task_metrics(predict(model, ImpressionReader(ev, spec, fz, batch_size=8192, with_eval=True,
                                                     progress=False)), spec)
    assert m["ctr"]["auc"] > 0.6, m["ctr"]
    for t in ("ctcvr", "ctcollect", "ctcart"):
        assert m[t]["auc"] > 0.62, (t, m[t])
    if not esmm:
        for t in ("cvr", "collect", "cart"):
            assert m[t]["auc"] > 0.55, (t, m[t])
    assert m["stay"]["r2"] > 0.02, m["stay"]
    # the model's logloss beats the constant base-rate logloss on all impressions
    rate = m["ctr"]["observed_rate"]
    const = -(rate * np.log(rate) + (1 - rate) * np.log(1 - rate))
    assert m["ctr"]["logloss"] < const - 0.003
    assert result.epochs[1]["loss"]["ctr"] < result.epochs[0]["loss"]["ctr"]


@pytest.mark.slow
def test_same_seed_same_weights(one_day):
    setup = one_day
    cfg = TrainConfig(batch_size=2048, shuffle_buffer=8192, seed=5)
    a, _, _ = train(setup, cfg)
    b, _, _ = train(setup, cfg)
    for (k, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), k
    c, _, _ = train(setup, cfg.model_copy(update={"seed": 6}))
    assert not torch.equal(a.towers.weights[0], c.towers.weights[0])


class Interrupt(Exception):
    pass


@pytest.mark.slow
@pytest.mark.parametrize("cache_mode", [None, "memory", "disk"])
def test_resume_equals_uninterrupted(one_day, tmp_path, monkeypatch, cache_mode):
    """Bit-exact, also when the epochs come from the feature cache: the resumed run refills it (memory)
    or finds the interrupted run's chunks (disk) and draws the same batches."""
    from mtrank.pipeline.feature_cache import FeatureCache

    setup = one_day

    cache = None if cache_mode is None else (
        lambda: FeatureCache(cache_mode, 1 if cache_mode == "disk" else 1 << 30, tmp_path / "fc"))
    cfg = TrainConfig(epochs=2, batch_size=1024, shuffle_buffer=8192, checkpoint_every=7,
                      loss_weighting="uncertainty", seed=11)   # 30 steps an epoch
    full, _, full_result = train(setup, cfg, cache=cache)
    steps = full_result.global_step

    store = CheckpointStore(tmp_path / "ck")
    calls = {"n": 0}
    real_step = Trainer.step

    def crashing_step(self, batch, active=1):
        calls["n"] += 1
        if calls["n"] == steps - 10:  # mid second epoch, 3 steps after a checkpoint
            raise Interrupt
        return real_step(self, batch, active)

    monkeypatch.setattr(Trainer, "step", crashing_step)
    with pytest.raises(Interrupt):
        train(setup, cfg, store=store, cache=cache)
    monkeypatch.setattr(Trainer, "step", real_step)
    resumed, trainer, result = train(setup, cfg, store=store, resume=True, cache=cache)
    assert result.resumed_from_step is not None and 0 < result.resumed_from_step < steps - 10
    assert result.global_step == steps and result.rows_trained == full_result.rows_trained
    for (k, x), (_, y) in zip(full.state_dict().items(), resumed.state_dict().items()):
        torch.testing.assert_close(x, y, rtol=0, atol=0, msg=k)
    # per-epoch figures survive the interruption too
    assert result.epochs[1]["rows"] == full_result.epochs[1]["rows"]
    assert result.epochs[1]["loss"] == pytest.approx(full_result.epochs[1]["loss"], rel=1e-6)


@pytest.mark.slow
def test_resume_refuses_another_config(one_day, tmp_path):
    setup = one_day
    store = CheckpointStore(tmp_path / "ck")
    train(setup, TrainConfig(batch_size=4096, seed=1), store=store)
    with pytest.raises(ResumeMismatchError, match=r"train\.lr: 0\.001 -> 0\.01; refusing to resume"):
        train(setup, TrainConfig(batch_size=4096, seed=1, lr=0.01), store=store, resume=True)
    # more epochs is not a different run: it continues
    _, _, r = train(setup, TrainConfig(batch_size=4096, seed=1, epochs=2), store=store, resume=True)
    assert r.resumed_from_step is not None and len(r.epochs) == 2


def test_checkpoint_store_skips_corrupt_and_never_loads_partial(tmp_path):
    store = CheckpointStore(tmp_path, keep=2)
    store.save({"x": torch.tensor([1.0])}, 1)
    store.save({"x": torch.tensor([2.0])}, 2)
    store.save({"x": torch.tensor([3.0])}, 3)
    assert sorted(p.name for p in tmp_path.glob("step-*.pt")) == ["step-000000002.pt", "step-000000003.pt"]
    (tmp_path / ".step-000000004.pt.tmp").write_bytes(b"half a checkpoint")  # a crash mid-write
    assert store.load_latest()["x"].item() == 3.0
    newest = tmp_path / "step-000000003.pt"
    newest.write_bytes(newest.read_bytes()[:-20])  # truncated after the fact
    assert store.load_latest()["x"].item() == 2.0
    (tmp_path / "step-000000002.pt").unlink()
    with pytest.raises(CheckpointError, match="no intact checkpoint"):
        store.load_latest()
    assert CheckpointStore(tmp_path / "empty").load_latest() is None


def test_nan_loss_stops_with_clear_error(setup):
    spec, _, stats, _ = setup
    cfg = TrainConfig(batch_size=1024, shuffle=False)
    model = build_model(spec, SMALL, 0, stats)
    with torch.no_grad():
        model.towers.biases[-1][0].fill_(float("nan"))
    with pytest.raises(NonFiniteLossError, match="non-finite loss at step 1.*ctr=nan"):
        Trainer(model, spec, cfg).fit(reader(setup, cfg), progress=False)


def test_rowwise_adagrad_updates_only_touched_rows():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(10, 4))
    before = w.detach().clone()
    opt = RowWiseAdagrad([w], lr=0.1)
    ids = torch.tensor([1, 3, 3, 7])
    torch.nn.functional.embedding(ids, w, sparse=True).sum().backward()
    opt.step()
    changed = (w.detach() != before).any(1).nonzero().squeeze(1).tolist()
    assert changed == [1, 3, 7]
    # row 3 appeared twice: one update with the summed gradient (2 per element): step = lr * g/sqrt(g^2)
    torch.testing.assert_close(w.detach()[3], before[3] - 0.1 * torch.ones(4) * 2 / (2 + 1e-8))
    acc = opt.state[w]["sum"]
    assert acc[3].item() == pytest.approx(4.0) and acc[1].item() == pytest.approx(1.0) and acc[0].item() == 0.0


def test_rowwise_adagrad_matches_the_textbook_update_bit_for_bit():
    """The fast path (int32 sort in coalesce, gather + copy back instead of index_add_) gives
    torch's coalesce and `w[r] -= lr * g / (sqrt(acc) + eps)` exactly, duplicates summed first."""
    from mtrank.pipeline.optim import coalesce

    g = torch.Generator().manual_seed(3)
    rows, dim = 50_000, 8
    ids = torch.randint(0, rows, (20_000,), generator=g) // 7 * 7      # many duplicates, unsorted
    values = torch.randn(ids.numel(), dim, generator=g)
    grad = torch.sparse_coo_tensor(ids.unsqueeze(0), values, (rows, dim))
    fast, ref = coalesce(grad), grad.coalesce()
    assert torch.equal(fast.indices(), ref.indices())
    torch.testing.assert_close(fast.values(), ref.values(), rtol=0, atol=1e-5)   # summation order may differ

    w0 = torch.randn(rows, dim, generator=g)
    w = torch.nn.Parameter(w0.clone())
    opt = RowWiseAdagrad([w], lr=0.05, initial_accumulator=0.1)
    w.grad = grad
    opt.step()
    r, v = fast.indices()[0], fast.values()
    acc = torch.full((rows,), 0.1)
    acc[r] += v.square().mean(1)
    expect = w0.clone()
    expect[r] = w0[r] - 0.05 * (v / (acc[r].sqrt() + 1e-8).unsqueeze(1))
    assert torch.equal(opt.state[w]["sum"], acc)
    assert torch.equal(w.detach(), expect)


def test_dense_adam_matches_torch_bit_for_bit_without_importing_dynamo():
    """pipeline.optim runs torch's Adam without the torch._dynamo import (1.4 s a process): the same
    weights and state as torch.optim.Adam, a fresh process that trains never loads dynamo, and
    torch's own functions are not left changed (a torch.compile in the same process keeps them)."""
    import subprocess
    import sys

    code = """
import sys, torch
from mtrank.pipeline.optim import dense_optimizer, sparse_optimizer

def run(make):
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    e = torch.nn.Embedding(50, 4, sparse=True)
    opt, sparse = make(list(m.parameters())), sparse_optimizer([e.weight], "rowwise_adagrad", 0.05)
    g = torch.Generator().manual_seed(1)
    for _ in range(6):
        x, ids = torch.randn(16, 8, generator=g), torch.randint(0, 50, (16,), generator=g)
        (m(x).square().sum() + e(ids).sum()).backward()
        opt.step(); sparse.step(); opt.zero_grad(); sparse.zero_grad()
    opt.load_state_dict(opt.state_dict())
    return [p.detach().clone() for p in m.parameters()], opt.state_dict()["state"]

ours, ours_state = run(lambda p: dense_optimizer(p, 0.01, 0.001))
loaded = "torch._dynamo" in sys.modules
# nothing of torch's is left changed: its wrapped functions have no cached "not traced" copy
from torch.optim.adam import adam
wrapped = [f for f in [*vars(torch.optim.Optimizer).values(), *(c.cell_contents for c in adam.__closure__)]
           if hasattr(f, "__wrapped__")]
untouched = bool(wrapped) and not any(hasattr(f.__wrapped__, "__dynamo_disable") for f in wrapped)
theirs, theirs_state = run(lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=0.001, fused=True))
same = all(torch.equal(a, b) for a, b in zip(ours, theirs)) and all(
    torch.equal(ours_state[k][n], theirs_state[k][n]) for k in ours_state for n in ours_state[k])
print(loaded, untouched, "torch._dynamo" in sys.modules, same)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    # ours: no dynamo, torch's functions left as they were; torch's Adam: dynamo; bit-identical
    assert out == ["False", "True", "True", "True"]


def test_train_config_is_strict():
    with pytest.raises(ValueError, match="lrr"):
        TrainConfig(lrr=0.1)
    with pytest.raises(ValueError):
        TrainConfig(precision="fp16")


@pytest.mark.skipif(not bf16_supported(), reason="CPU without avx512_bf16/AMX")
def test_bf16_trains_like_fp32(one_day):
    setup = one_day
    cfg = TrainConfig(batch_size=2048, shuffle_buffer=8192, precision="fp32")
    _, t32, r32 = train(setup, cfg)
    _, t16, r16 = train(setup, cfg.model_copy(update={"precision": "auto"}))   # bf16 on this CPU
    assert (t32.precision, t16.precision) == ("fp32", "bf16")
    for t, v in r32.epochs[0]["loss"].items():
        assert r16.epochs[0]["loss"][t] == pytest.approx(v, rel=0.05), t


def test_precision_auto_resolves_by_device_and_resume_refuses_another_precision(one_day, tmp_path):
    """auto = bf16 only on a CPU with bf16 instructions (CUDA stays fp32); the resolved precision is
    part of the checkpoint fingerprint, so a checkpoint written in bf16 never resumes in fp32."""
    from mtrank.pipeline.trainer import resolve_precision

    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert resolve_precision("auto", cpu) == ("bf16" if bf16_supported() else "fp32")
    assert resolve_precision("auto", gpu) == "fp32" and resolve_precision("fp32", cpu) == "fp32"
    if not bf16_supported():
        with pytest.raises(ValueError, match="avx512_bf16 or AMX"):
            resolve_precision("bf16", cpu)
    auto = TrainConfig(batch_size=2048, precision="auto", epochs=1, checkpoint_every=5)
    here = resolve_precision("auto", cpu)
    store = CheckpointStore(tmp_path / "ck")
    train(one_day, auto, store=store)
    # the same precision named explicitly resumes (the checkpoint's, not the setting's spelling)
    _, _, again = train(one_day, auto.model_copy(update={"precision": here, "epochs": 2}), store=store, resume=True)
    assert again.resumed_from_step is not None and again.resumed_from_step > 0
    if bf16_supported():
        with pytest.raises(ResumeMismatchError):
            train(one_day, auto.model_copy(update={"precision": "fp32", "epochs": 3}), store=store, resume=True)


@pytest.mark.slow
def test_early_stopping_stops_after_patience_and_keeps_the_best_epoch(setup, tmp_path):
    """The held-out day (the window's fourth) is evaluated with the trainer's own validation loss;
    a scripted rise after the second epoch stands in for a model that starts to memorise."""
    from mtrank.pipeline.trainer import TrainingEvents

    spec, _, _, fz = setup
    held = ImpressionReader(open_window(setup[1].root, spec, START + dt.timedelta(days=3), START + dt.timedelta(days=3)),
                            spec, fz, batch_size=8192, progress=False)
    cfg = TrainConfig(epochs=6, batch_size=4096, seed=2, validation_days=1, early_stopping={"patience": 2})
    model = build_model(spec, SMALL, cfg.seed, setup[2])
    trainer = Trainer(model, spec, cfg, CheckpointStore(tmp_path / "ck"))
    rises = iter([0.0, 0.0, 0.05, 0.06, 0.07, 0.08])   # epochs 3.. look worse than epoch 2

    def validate():
        loss = trainer.validation_loss(held)
        bump = next(rises)
        return {"loss": {t: v + bump for t, v in loss.items()}}

    snapshots = {}

    class Snap(TrainingEvents):
        def on_epoch(self, record):
            snapshots[record["epoch"]] = {k: v.clone() for k, v in model.state_dict().items()}

    result = trainer.fit(reader(setup, cfg), progress=False, events=Snap(), validate=validate)
    assert result.stopped_early and len(result.epochs) == 4        # best at epoch index 1, then 2 worse epochs
    assert result.best_epoch == 1 and result.epochs[-1]["best_epoch"] == 1
    for k, v in model.state_dict().items():                       # the model is epoch 2's weights
        torch.testing.assert_close(v, snapshots[1][k], rtol=0, atol=0, msg=k)
    assert (tmp_path / "ck" / Trainer.BEST).exists()
    # a resume of the stopped run trains nothing more and restores the same weights from disk
    again = build_model(spec, SMALL, 99, setup[2])
    resumed = Trainer(again, spec, cfg, CheckpointStore(tmp_path / "ck")).fit(reader(setup, cfg), resume=True,
                                                                            progress=False, validate=validate)
    assert len(resumed.epochs) == 4 and resumed.best_epoch == 1
    for k, v in again.state_dict().items():
        torch.testing.assert_close(v, snapshots[1][k], rtol=0, atol=0, msg=k)


def test_early_stopping_needs_validation_days():
    with pytest.raises(ValueError, match="validation_days"):
        TrainConfig(early_stopping={"patience": 1})


def test_early_stopping_objective_auc_follows_ranking_where_the_loss_wavers(setup):
    """Validation AUC still rising while the summed loss already bottomed out (Adult, 2026-11-30):
    `objective: auc` keeps training and picks the best-ranking epoch; `loss` stops at the loss's
    minimum. Without a binary task's AUC the auc objective falls back to the loss."""
    from mtrank.pipeline.trainer import EarlyStopping, _early_stop

    spec = setup[0]
    binary = [t.name for t in spec.tasks if t.type == "binary"]
    losses = [0.50, 0.45, 0.46, 0.47, 0.48]
    aucs = [0.70, 0.72, 0.73, 0.74, 0.745]
    history = [{"epoch": i, "validation": {"loss": {t: v for t in binary}, "auc": {t: a for t in binary}}}
               for i, (v, a) in enumerate(zip(losses, aucs))]
    assert _early_stop(history, spec, EarlyStopping(patience=2)) == (1, True)
    assert _early_stop(history, spec, EarlyStopping(patience=2, objective="auc")) == (4, False)
    no_auc = [{**e, "validation": {"loss": e["validation"]["loss"]}} for e in history]
    assert _early_stop(no_auc, spec, EarlyStopping(patience=2, objective="auc")) == (1, True)


def test_a_refused_resume_names_what_changed():
    then = {"spec": "ab12", "model": {"experts": 8, "expert_mlp": [256, 128]}, "train": {"lr": 0.001, "seed": 1},
            "window": "2026-11-01..07"}
    assert setup_differences(then, then) == ""
    now = {**then, "model": {"experts": 4, "expert_mlp": [256, 128]}, "window": "2026-11-02..08"}
    assert setup_differences(then, now) == 'model.experts: 8 -> 4; window: "2026-11-01..07" -> "2026-11-02..08"'
    now = {**now, "train": {"lr": 0.01, "seed": 2}, "world_size": 2}
    got = setup_differences(then, now)
    # sorted, three named, the rest counted; a key only one side has reads <unset>
    assert got.startswith("model.experts: 8 -> 4; train.lr: 0.001 -> 0.01; train.seed: 1 -> 2") and \
        got.endswith("(and 2 more)"), got
    assert '"<unset>" -> 2' in setup_differences({}, {"world_size": 2})
    e = pickle.loads(pickle.dumps(ResumeMismatchError("why", "what to do")))
    assert (str(e), e.problem, e.remedy) == ("why; what to do", "why", "what to do")
    long = setup_differences({"stats": "x" * 500}, {"stats": "y" * 500})
    assert len(long) < 120 and "..." in long
    # what a checkpoint records: the spec whole, so a spec change is named by its field
    records = [Trainer(build_model(spec, SMALL, 0), spec, TrainConfig(), None)._record()
               for spec in (capped_spec(16_384), capped_spec(8_192))]
    got = setup_differences(*records)
    assert re.search(r"spec\.(tables|features)\.\w+\.buckets: 16384 -> 8192", got), got
    assert "model." not in got and "train." not in got
