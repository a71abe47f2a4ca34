"""Daily warm starts: spec compatibility, weight transfer, lineage across days, a real registry."""
import datetime as dt
import json
import subprocess

import pytest
import torch
import yaml

from mtrank.features.compat import compare_specs
from mtrank.features.spec import load_spec, parse_spec
from mtrank.jobs.model_io import load_model
from mtrank.models import ModelConfig
from mtrank.models.warm_start import table_rows, transfer_weights
from mtrank.pipeline.dataset import open_window
from mtrank.pipeline.evaluate import predict, task_metrics
from mtrank.pipeline.reader import ImpressionReader
from mtrank.pipeline.trainer import build_model
from mtrank.features.featurize import Featurizer
from tests.conftest import MTRANK, cli_daily, generate_demo_logs, small_spec, sqlite_client, write_job

pytestmark = pytest.mark.slow   # end to end

SMALL = ModelConfig(experts=2, expert_mlp=[8], tower_mlp=[4])


def _edit(spec, **changes):
    raw = yaml.safe_load(spec.to_yaml())
    for name, fn in changes.items():
        fn(raw)
    return parse_spec(raw)


def _buckets(raw, feature, n):
    for f in raw["features"]:
        if f["name"] == feature:
            f["buckets"] = n


def test_compare_specs_names_what_changed(spec):
    assert compare_specs(spec, spec).compatible
    ch = compare_specs(spec, _edit(spec, b=lambda r: _buckets(r, "item_id", 2048)))
    assert list(ch.tables) == ["item_id"] and "buckets" in ch.tables["item_id"] and not ch.blocking
    ch = compare_specs(spec, _edit(spec, s=lambda r: r.update(hash_seed=r["hash_seed"] + 1)))
    assert set(ch.tables) == set(spec.embedding_tables) and not ch.blocking
    ch = compare_specs(spec, _edit(spec, f=lambda r: r["features"].pop()))
    assert ch.blocking and "removed" in ch.blocking[0]
    ch = compare_specs(spec, _edit(spec, d=lambda r: r["tables"]["category"].update(dim=8)))
    assert any("category" in b and "dim" in b for b in ch.blocking)
    # admission adds a rare row (a table change, shared table or own); l2 and dropout change nothing
    ch = compare_specs(spec, _edit(spec, m=lambda r: r["tables"]["category"].update(min_count=3)))
    assert list(ch.tables) == ["category"] and "rare row" in ch.tables["category"] and not ch.blocking
    ch = compare_specs(spec, _edit(spec, m=lambda r: _option(r, "item_id", min_count=5)))
    assert list(ch.tables) == ["item_id"] and not ch.blocking
    assert compare_specs(spec, _edit(spec, o=lambda r: _option(r, "item_id", l2=1e-5, dropout=0.1))).compatible
    # a serving value (position) is never read in training: setting or changing it blocks nothing
    assert compare_specs(spec, _edit(spec, p=lambda r: _option(r, "position", serve_value=3))).compatible
    assert compare_specs(spec, _edit(spec, p=lambda r: _option(r, "position", serve_value=None))).compatible


def _option(raw, feature, **kw):
    next(f for f in raw["features"] if f["name"] == feature).update(kw)


def test_transfer_copies_tables_and_layers_and_reinitialises_changed_tables(spec):
    parent = build_model(spec, SMALL, seed=1)
    new_spec = _edit(spec, b=lambda r: _buckets(r, "item_id", 4096))
    child = build_model(new_spec, SMALL, seed=2)
    fresh = child.embeddings.weights[0].detach().clone()
    transfer_weights(parent, child, frozenset(["item_id"]))
    pe, ce = parent.embeddings, child.embeddings
    for name in ce.table_base:
        rows = table_rows(child, name)
        src = pe.weights[pe.dims.index(pe.table_dim[name])][pe.table_base[name]:pe.table_base[name] + table_rows(parent, name)]
        dst = ce.weights[ce.dims.index(ce.table_dim[name])][ce.table_base[name]:ce.table_base[name] + rows]
        if name == "item_id":
            assert rows == 4096 and torch.equal(dst, fresh[ce.table_base[name]:ce.table_base[name] + rows])
        else:
            assert torch.equal(src, dst)
    for (k, a), b in zip(parent.bottom.state_dict().items(), child.bottom.state_dict().values()):
        assert torch.equal(a, b), k
    with pytest.raises(ValueError, match="item_id"):
        transfer_weights(parent, build_model(new_spec, SMALL, seed=2))  # not marked for re-init


# ------------------------------------------------------------------------------------------ jobs

@pytest.fixture(scope="module")
def base(tmp_path_factory):
    base = tmp_path_factory.mktemp("warm")
    generate_demo_logs(base / "logs", days=5, rows=20_000, seed=12, users=2000, items=800)
    small_spec(base / "spec.yaml")
    write_job(base / "job.yaml", "inc", {"batch_size": 1024, "epochs": 1, "lr": 0.003},
              warm_start={"from": "champion", "days": 1})
    for date in ("2026-11-03", "2026-11-04", "2026-11-05"):  # full, then two increments, each a new process
        r = daily(base, "job.yaml", date)
        assert r.returncode == 0, r.stderr
    return base


daily, client = cli_daily, sqlite_client


def test_lineage_tags_across_three_days(base):
    c = client(base)
    tags = {v: c.get_model_version("inc", v).tags for v in ("1", "2", "3")}
    assert tags["1"]["mtrank.train_mode"] == "full" and tags["1"]["mtrank.root_version"] == "1"
    assert "mtrank.parent_version" not in tags["1"]
    # precision auto (the default): the precision that ran, as the trainer resolved it on this CPU
    from mtrank.pipeline.trainer import bf16_supported
    assert {t["mtrank.precision"] for t in tags.values()} == {"bf16" if bf16_supported() else "fp32"}
    assert tags["1"]["mtrank.window"] == "2026-11-01..2026-11-02"
    for v, parent, day in (("2", "1", "2026-11-03"), ("3", "2", "2026-11-04")):
        t = tags[v]
        assert t["mtrank.train_mode"] == "warm" and t["mtrank.parent_version"] == parent
        assert t["mtrank.root_version"] == "1" and t["mtrank.depth"] == str(int(v) - 1)
        assert t["mtrank.window"] == f"{day}..{day}"  # the newest day only
        run = c.get_run(c.get_model_version("inc", v).run_id)
        assert run.info.run_name.endswith(f"warm-from-v{parent}")
    r = subprocess.run([*MTRANK, "lineage", "--config", base / "job.yaml", "--version", "3"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    lines = [ln.strip() for ln in r.stdout.splitlines()[1:]]
    assert [ln.split()[0] for ln in lines] == ["v3", "v2", "v1"]
    assert "warm start from v2" in lines[0] and "full retrain" in lines[2]


def test_warm_start_continues_training(base):
    """On the parent's own training data, the child's loss does not jump (a fresh model's does)."""
    spec = load_spec(base / "spec.yaml")
    runs = base / "work" / "runs" / "inc"
    parent, child = load_model(runs / "2026-11-03" / "model"), load_model(runs / "2026-11-04" / "model")
    assert (runs / "2026-11-04" / "model" / "optimizer.pt").exists()
    lineage = json.loads((runs / "2026-11-04" / "metrics.json").read_text())["lineage"]
    assert lineage["optimizer_state"] and lineage["numeric_stats"] == "running"
    day = dt.date(2026, 11, 2)

    def loss(saved):
        reader = ImpressionReader(open_window(base / "logs", saved.spec, day, day), saved.spec,
                                  Featurizer(saved.spec, saved.stats), batch_size=8192, progress=False)
        return task_metrics(predict(saved.model, reader), spec)["ctr"]["logloss"]

    fresh = load_model(runs / "2026-11-03" / "model")
    fresh.model.load_state_dict(build_model(spec, fresh.config, seed=99).state_dict())
    lp, lc, lf = loss(parent), loss(child), loss(fresh)
    assert lc < lp + 0.01, (lp, lc)
    assert lf > lp + 0.05, (lp, lf)


def test_incompatible_spec_is_refused_naming_the_table(base):
    raw = yaml.safe_load((base / "spec.yaml").read_text())
    _buckets(raw, "item_id", 4096)
    (base / "changed_spec.yaml").write_text(yaml.safe_dump(raw))
    cfg = yaml.safe_load((base / "job.yaml").read_text())
    cfg["spec"] = "changed_spec.yaml"
    (base / "changed.yaml").write_text(yaml.safe_dump(cfg))
    r = daily(base, "changed.yaml", "2026-11-05", "--force")
    assert r.returncode == 2
    assert "table 'item_id'" in r.stderr and "buckets" in r.stderr and "reinit_changed_tables" in r.stderr
    cfg["warm_start"]["reinit_changed_tables"] = True
    (base / "reinit.yaml").write_text(yaml.safe_dump(cfg))
    r = daily(base, "reinit.yaml", "2026-11-05", "--force")
    assert r.returncode == 0, r.stderr
    lineage = json.loads((base / "work" / "runs" / "inc" / "2026-11-05" / "metrics.json").read_text())["lineage"]
    assert lineage["reinitialised_tables"] == ["item_id"] and lineage["mode"] == "warm"


def test_full_retrain_starts_a_new_chain(base):
    r = daily(base, "job.yaml", "2026-11-05", "--force", "--full")
    assert r.returncode == 0, r.stderr
    assert "from scratch on 2026-11-03..2026-11-04" in r.stdout
    c = client(base)
    newest = max(c.search_model_versions("name='inc'"), key=lambda v: int(v.version))
    assert newest.tags["mtrank.train_mode"] == "full" and newest.tags["mtrank.root_version"] == str(newest.version)
