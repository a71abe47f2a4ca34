"""Validation inside the epochs (train.validate_every_steps): the epoch-end validation's per-task loss
and AUC every N global steps, as points of their own in the history, the report and MLflow; training
is bit-identical with or without them, also across an interruption and resume."""
from __future__ import annotations

import datetime as dt
import json
import math
import re

import pytest
import torch
import yaml
from pydantic import ValidationError

from mtrank.features.featurize import Featurizer
from mtrank.features.spec import load_spec
from mtrank.models import ModelConfig
from mtrank.pipeline.checkpoint import CheckpointStore
from mtrank.pipeline.dataset import open_window
from mtrank.pipeline.evaluate import predict, task_metrics
from mtrank.pipeline.reader import ImpressionReader, fit_numeric_stats
from mtrank.pipeline.synthetic.impressions import ImpressionConfig, generate_impressions
from mtrank.pipeline.trainer import TrainConfig, Trainer, TrainingEvents, build_model
from tests.conftest import generate_demo_logs, mtrank_in_process, small_spec, sqlite_client, write_job

START = dt.date(2026, 11, 1)
MODEL = ModelConfig(experts=2, expert_mlp=(16, 8), tower_mlp=(8,), dropout=0.2)   # dropout draws from the RNG
BATCH = 256


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Two training days of 2,000 rows and a held-out third; a small spec whose item ids are dropped
    at random while training (id dropout), so both dropouts draw from the RNG that validation must
    leave alone."""
    root = tmp_path_factory.mktemp("vsteps")
    generate_impressions(root / "logs", ImpressionConfig(seed=4, start=START, days=3, rows_per_day=2000, n_users=400,
                                                         n_items=200, n_brands=50, n_shops=80, n_categories=30),
                         progress=False)
    path = small_spec(root / "spec.yaml", max_buckets=2048)
    d = yaml.safe_load(path.read_text())
    next(f for f in d["features"] if f["name"] == "item_id")["dropout"] = 0.1
    path.write_text(yaml.safe_dump(d))
    spec = load_spec(path)
    train = open_window(root / "logs", spec, START, START + dt.timedelta(days=1))
    held = open_window(root / "logs", spec, START + dt.timedelta(days=2), START + dt.timedelta(days=2))
    stats = fit_numeric_stats(ImpressionReader(train, spec, progress=False))
    return spec, train, held, stats, Featurizer(spec, stats)


class Points(TrainingEvents):
    """The validation points as the events deliver them, and the model's mode at each."""

    def __init__(self, model, stop_at: int | None = None):
        self.model, self.stop_at, self.points, self.modes = model, stop_at, [], []

    def on_steps(self, point):
        self.modes.append(self.model.training)

    def on_validation(self, point):
        if point["step"] == self.stop_at:
            raise Interrupted(point["step"])
        self.points.append(point)


class Interrupted(Exception):
    pass


def fit(setup, cfg: TrainConfig, store: CheckpointStore | None = None, resume: bool = False,
        stop_at: int | None = None):
    """A trainer over the two days, validated on the third as the train job does it: the trainer's
    own loss terms and the AUC of every figure."""
    spec, train, held, stats, fz = setup
    model = build_model(spec, MODEL, cfg.seed, stats)
    trainer = Trainer(model, spec, cfg, store)

    def validate():
        reader = lambda: ImpressionReader(held, spec, fz, batch_size=1024, progress=False)  # noqa: E731
        figures = task_metrics(predict(model, reader()), spec)
        return {"loss": trainer.validation_loss(reader()),
                "auc": {f: m["auc"] for f, m in figures.items() if "auc" in m}}

    events = Points(model, stop_at)
    reader = ImpressionReader(train, spec, fz, batch_size=cfg.batch_size, shuffle=True, shuffle_buffer=1024,
                              seed=cfg.seed, progress=False)
    result = trainer.fit(reader, resume=resume, progress=False, events=events, validate=validate)
    return model, result, events


def cfg(**kw) -> TrainConfig:
    return TrainConfig(**{"epochs": 2, "batch_size": BATCH, "seed": 3, "lr": 3e-3, "validation_days": 1,
                          "log_every_steps": 1, **kw})


def same(a, b) -> bool:
    """Equal figures, NaN (an AUC with one class) included."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def assert_same_weights(a, b):
    for (k, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(x, y, rtol=0, atol=0, msg=k)


def test_points_every_n_steps_leave_training_bit_identical(setup):
    every = 5
    plain, base, _ = fit(setup, cfg())
    model, result, events = fit(setup, cfg(validate_every_steps=every))
    ends = [e["step"] for e in result.epochs]
    assert len(ends) == 2 and ends[0] > 2 * every                       # several points in each epoch
    expected = [s for s in range(every, result.global_step + 1, every) if s not in ends]
    assert [p["step"] for p in result.validation_steps] == expected
    assert events.points == result.validation_steps                     # the events saw the same points
    tasks = set(result.epochs[0]["loss"])
    for p in result.validation_steps:
        assert p["epoch"] == (0 if p["step"] < ends[0] else 1)
        if p["epoch"] == 0:
            assert p["samples"] == p["step"] * BATCH                     # full batches before the epoch's last
        v = p["validation"]
        assert set(v["loss"]) == tasks and all(math.isfinite(x) for x in v["loss"].values())
        assert v["auc"]["ctr"] is not None and 0.0 < v["auc"]["ctr"] < 1.0
        assert all(math.isfinite(x) for x in v["auc"].values() if x is not None)
    assert all(events.modes) and model.training                         # back in train mode after each
    # validation changed nothing: weights, training losses and the epoch ends' figures
    assert_same_weights(plain, model)
    for a, b in zip(base.epochs, result.epochs):
        assert a["loss"] == b["loss"] and same(a["validation"], b["validation"]) and a["step"] == b["step"]
    assert base.validation_steps == []


def test_an_interrupted_run_resumes_bit_exact_with_its_points(setup, tmp_path):
    """Checkpoints at the validation steps: the interruption comes after step 10's checkpoint and
    before its point is recorded; the resumed run takes that point and trains on exactly as the
    uninterrupted run did."""
    c = cfg(validate_every_steps=5, checkpoint_every=5)
    full, full_result, _ = fit(setup, c)
    store = CheckpointStore(tmp_path / "ck", keep=10)
    with pytest.raises(Interrupted):
        fit(setup, c, store=store, stop_at=10)
    resumed, result, events = fit(setup, c, store=store, resume=True)
    assert result.resumed_from_step == 10
    assert_same_weights(full, resumed)
    assert same(result.validation_steps, full_result.validation_steps)  # the earlier points came back too
    assert [p["step"] for p in events.points][0] == 10                   # the missing point, taken on resume
    assert same([e["validation"] for e in result.epochs], [e["validation"] for e in full_result.epochs])


def test_config_needs_a_validation_split_and_keeps_checkpoints_resumable():
    with pytest.raises(ValidationError, match="validate_every_steps"):
        TrainConfig(validate_every_steps=10)
    with pytest.raises(ValidationError):
        TrainConfig(validate_every_steps=-1, validation_days=1)
    TrainConfig(validate_every_steps=10, validation_fraction=0.1)
    assert TrainConfig(validation_days=1).validate_every_steps == 0     # epoch ends only
    # leaves the weights bit-identical: a checkpoint resumes under another cadence (or none)
    assert (TrainConfig(validation_days=1, validate_every_steps=7).fingerprint_fields()
            == TrainConfig(validation_days=1).fingerprint_fields())


@pytest.mark.slow
def test_a_job_writes_the_points_to_metrics_report_and_mlflow(tmp_path):
    """A tracked `mtrank train`: the live run gets the points as they are taken, registration logs
    them from metrics.json when the live run missed them."""
    from mtrank.jobs.tracking import _log_curves

    generate_demo_logs(tmp_path / "logs", days=3, rows=2000, seed=5, users=400, items=200)
    small_spec(tmp_path / "spec.yaml", max_buckets=2048)
    write_job(tmp_path / "job.yaml", "vsteps", {"batch_size": 256, "epochs": 2, "validation_fraction": 0.2,
                                               "validate_every_steps": 4})
    r = mtrank_in_process("train", "--config", tmp_path / "job.yaml", "--date", "2026-11-03", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "work" / "runs" / "vsteps" / "2026-11-03"
    m = json.loads((out / "metrics.json").read_text())
    ends = [e["step"] for e in m["epochs"]]
    points = m["history"]["validation_steps"]
    assert [p["step"] for p in points] == [s for s in range(4, m["global_step"] + 1, 4) if s not in ends]
    assert len(points) >= 4 and len(m["history"]["validation"]) == 2    # the epoch ends stay as they were
    for p in points:
        assert p["epoch"] in (0, 1) and p["samples"] > 0 and p["rows"] > 0
        assert all(math.isfinite(v) for v in p["loss"].values()) and 0.0 < p["auc"]["ctr"] < 1.0
    report = json.loads((out / "report" / "metrics.json").read_text())
    assert report["history"] == m["history"]
    html = (out / "report" / "report.html").read_text()
    assert "<th>at</th>" in html and html.count("<td>step</td>") == len(points)
    assert html.count("<td>epoch end</td>") == 2
    # MLflow: the points under the epoch ends' names, each step once; live, and from metrics.json for a
    # run that missed them (registration's catch-up)
    client = sqlite_client(tmp_path)
    (live,) = client.search_runs([client.get_experiment_by_name("vsteps").experiment_id])
    missed = client.create_run(live.info.experiment_id).info.run_id
    _log_curves(client, missed, {k: v for k, v in m.items() if k != "tasks"})
    for run_id in (live.info.run_id, missed):
        val = client.get_metric_history(run_id, "val_loss.ctr")
        assert sorted(h.step for h in val) == sorted(ends + [p["step"] for p in points])
        auc = {h.step: h.value for h in client.get_metric_history(run_id, "val_auc.ctr")}
        assert auc[points[0]["step"]] == pytest.approx(points[0]["auc"]["ctr"])


def test_the_report_draws_and_tabulates_the_points_in_step_order():
    import xml.etree.ElementTree as ET

    from mtrank.jobs.report import has_history, loss_figure, validation_table

    val = [{"epoch": e, "step": 10 * (e + 1), "loss": {"ctr": 0.5 - e / 100}, "auc": {"ctr": 0.7}} for e in range(2)]
    steps = [{"epoch": s // 10, "step": s, "samples": 256 * s, "loss": {"ctr": 0.6 - s / 1000}, "auc": {"ctr": 0.65}}
             for s in (4, 8, 14, 18)]
    history = {"train": [], "validation": val, "validation_steps": steps}
    assert has_history({"validation_steps": steps})
    svg = "{http://www.w3.org/2000/svg}"
    (panel,) = [g for g in ET.fromstring(loss_figure(history)).iter(svg + "g") if g.get("class") == "panel"]
    val, ends = (panel.find(f"{svg}g[@class='{c}']") for c in ("validation", "epoch-end"))
    assert [g.get("class") for g in panel.findall(svg + "g")] == ["validation", "epoch-end", "legend"]
    (poly,) = val.findall(svg + "polyline")                              # all points as a line, epoch ends marked
    line = [tuple(map(float, p.split(","))) for p in poly.get("points").split()]
    assert len(line) == len(val.findall(svg + "circle")) == len(val) - 1 == 6   # steps 4, 8, 10, 14, 18, 20
    xs = [x for x, _ in line]
    scale = (xs[-1] - xs[0]) / (20 - 4)
    assert all(abs(x - xs[0] - (step - 4) * scale) < 0.2 for x, step in zip(xs, [4, 8, 10, 14, 18, 20]))
    tops = [float(e.get("points").split()[0].split(",")[0]) for e in ends]   # the diamonds, at steps 10 and 20
    assert len(tops) == 2 and not ends.findall(svg + "polyline")
    assert tops == [xs[2], xs[5]]
    table = validation_table(history)
    assert "<th>at</th>" in table and table.count("<tr>") == 1 + 6
    rows = [re.findall(r"<td>(.*?)</td>", row) for row in table.split("<tr>")[2:]]
    at = [cells[2] for cells in rows]
    assert at == ["step", "step", "epoch end", "step", "step", "epoch end"]
    assert "<th>at</th>" not in validation_table({"validation": val})    # without points: the table as before
