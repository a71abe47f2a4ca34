"""`mtrank score` end to end: registered champion, generated candidates, exposures from the logs,
real Parquet in and out, a real sqlite MLflow store; and the bad-candidate paths."""
import json
import subprocess

import mlflow
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from tests.conftest import MTRANK, mtrank_in_process, write_job

pytestmark = pytest.mark.slow   # end to end

DATE = "2026-11-03"
CAP = 12


@pytest.fixture(scope="module")
def base(tmp_path_factory, ranker):
    """The shared trained ranker (its logs, spec and registry), with this module's scoring config."""
    base = tmp_path_factory.mktemp("score")
    for d in ("logs", "work", "spec.yaml"):
        (base / d).symlink_to(ranker / d)
    write_job(base / "job.yaml", "ranker", {"batch_size": 1024, "epochs": 1, "lr": 0.003},
              score={"list_size": 10, "traffic_cap": {"default_cap": CAP}, "window": {"n": 3, "k": 1}})
    run = mtrank_in_process
    r = run("generate", "--candidates", "--out", base / "cand", "--date", DATE, "--requests", 150,
            "--per-request", 40, "--seed", 4, "--users", 2000, "--items", 800)
    assert r.returncode == 0, r.stderr
    r = run("exposures", "--data", base / "logs", "--date", DATE, "--out", base / "exposures.parquet")
    assert r.returncode == 0, r.stderr
    return base


def score(base, *extra, candidates=None, config="job.yaml", process=False):
    """`mtrank score` with the champion: in its own process (`process`) or through main() here."""
    args = ["score", "--model", "models:/ranker@champion", "--config", base / config,
            "--candidates", candidates or base / "cand", "--date", DATE, *map(str, extra)]
    if process:
        return subprocess.run([*MTRANK, *map(str, args)], capture_output=True, text=True)
    return mtrank_in_process(*args)


def test_score_ranks_with_the_champion_and_logs_a_run(base):
    out = base / "ranked" / "out.parquet"
    r = score(base, "--out", out, "--exposures", base / "exposures.parquet", "--show", 1, process=True)
    assert r.returncode == 0, r.stderr
    assert "shown" in r.stdout and "capped" in r.stdout
    # the preview heads each factor column by its term: the column holds (offset + value)^exponent
    formula = next(line for line in r.stdout.splitlines() if line.startswith("score = "))
    header = next(line for line in r.stdout.splitlines() if line.strip().startswith("rank "))
    terms = [t.replace(" ", "") for t in formula.removeprefix("score = ").split(" · ")[:-1]]
    assert terms and all(t in header.split() for t in terms), (formula, header)
    cand = pq.read_table(base / "cand")
    ranked = pl.read_parquet(out)
    assert ranked.height == cand.num_rows
    shown = ranked.filter(pl.col("rank").is_not_null())
    per_request = shown.group_by("request_id").agg(pl.len(), pl.col("rank").max().alias("last"))
    assert per_request["len"].max() <= 10 and (per_request["len"] == per_request["last"]).all()
    # caps: today's exposures from the logs plus what this run allocated never exceed the cap
    seen = pl.read_parquet(base / "exposures.parquet").select("item_id", "exposures")
    alloc = shown.group_by("item_id").len().join(seen, on="item_id", how="left").fill_null(0)
    assert (alloc["len"] + alloc["exposures"]).max() <= CAP
    assert ranked.filter(pl.col("rules").cast(pl.String).str.contains("capped")).height > 0
    # outputs and factors written at the model's float32 (half the bytes), the score that ranks in float64;
    # the factors still multiply to the score
    factors = [c for c in ranked.columns if c.startswith("factor_")]
    assert ranked.schema["p_ctr"] == pl.Float32 and ranked.schema["score"] == pl.Float64
    assert factors and all(ranked.schema[c] == pl.Float32 for c in factors)
    product = ranked.select(pl.fold(pl.col("rule_weight"), lambda a, b: a * b.cast(pl.Float64), factors)).to_series()
    np.testing.assert_allclose(product.to_numpy(), ranked["score"].to_numpy(), rtol=1e-5)
    summary = json.loads((out.parent / "out.parquet.summary.json").read_text())
    assert summary["balanced"] and summary["rows_read"] == cand.num_rows and summary["model_version"] == "1"
    assert summary["seconds"]["forward_s"] > 0
    # the model's own hashing: the registered pyfunc gives the same predictions for the same rows
    uri = f"sqlite:///{(base / 'work' / 'mlflow.db').resolve()}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    pyfunc = mlflow.pyfunc.load_model("models:/ranker@champion")
    sample = cand.slice(0, 300)
    pred = pyfunc.predict(sample.to_pandas())
    want = pl.DataFrame({"request_id": sample["request_id"].to_pylist(), "item_id": sample["item_id"].to_pylist(),
                         "want": pred["p_ctr"].to_numpy()})
    got = want.join(ranked.select("request_id", "item_id", "p_ctr"), on=["request_id", "item_id"])
    assert got.height == 300
    np.testing.assert_allclose(got["p_ctr"].to_numpy(), got["want"].to_numpy(), rtol=1e-5)
    # one MLflow run for the job, with the counts
    runs = mlflow.MlflowClient(uri).search_runs(
        [mlflow.get_experiment_by_name("ranker").experiment_id], "tags.`mtrank.job` = 'score'")
    assert len(runs) == 1
    assert runs[0].data.metrics["rows_in"] == cand.num_rows
    assert runs[0].data.metrics["rules.capped"] > 0
    assert runs[0].data.tags["mtrank.model_version"] == "1"


def _broken(base, name: str, fn) -> str:
    t = fn(pq.read_table(base / "cand"))
    path = base / f"{name}.parquet"
    pq.write_table(t, path)
    return path


def test_bad_candidates_fail_naming_file_column_rule(base):
    cases = {
        "missing": (lambda t: t.drop(["category_id"]), ["category_id", "missing_column"]),
        "null_item": (lambda t: t.set_column(t.schema.get_field_index("item_id"), "item_id",
                                             pa.array([None] * 3 + t["item_id"].to_pylist()[3:], pa.int64())),
                      ["item_id", "null", "3 rows"]),
        "duplicate": (lambda t: pa.concat_tables([t, t.slice(0, 2)]), ["item_id", "duplicate_in_request", "2 rows"]),
    }
    for name, (fn, words) in cases.items():
        path = _broken(base, name, fn)
        out = base / f"{name}-out.parquet"
        r = score(base, "--out", out, "--no-track", candidates=path)
        assert r.returncode == 2, (name, r.stderr)
        for w in [str(path) if name != "duplicate" else name, *words]:
            assert w in r.stderr, (name, w, r.stderr)
        assert not out.exists()  # nothing half-written under the final name


def test_a_tracked_scoring_job_opens_its_run_first(base, tmp_path):
    """The run opens before the candidates are read (a server that refuses the user stops the job
    there: tests/test_mlflow_server.py): a job that then fails leaves its run FAILED, and a server that
    does not answer lets the lists be made, then says only the run is missing."""
    import socket

    model = base / "work" / "runs" / "ranker" / DATE / "model"   # a saved model: no registry needed
    cfg = yaml.safe_load((base / "job.yaml").read_text())
    cfg["tracking"] = {"retries": 0, "timeout_seconds": 5}
    (base / "fast.yaml").write_text(yaml.safe_dump(cfg))
    uri = f"sqlite:///{tmp_path / 'own.db'}"
    mlflow.MlflowClient(uri).search_experiments()   # this test's own empty store
    null_item = _broken(base, "null_item_tracked", lambda t: t.set_column(
        t.schema.get_field_index("item_id"), "item_id", pa.array([None] + t["item_id"].to_pylist()[1:], pa.int64())))
    args = ["score", "--model", model, "--config", base / "fast.yaml", "--date", DATE]
    r = mtrank_in_process(*args, "--tracking-uri", uri, "--candidates", null_item, "--out", tmp_path / "a.parquet")
    assert r.returncode == 2 and "rule null" in r.stderr, r.stderr[-2000:]
    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("ranker").experiment_id])
    assert [(x.info.status, x.data.tags["mtrank.job"], x.info.run_name) for x in runs] == \
        [("FAILED", "score", f"score-{DATE}")]

    with socket.socket() as sock:   # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = tmp_path / "b.parquet"
    r = mtrank_in_process(*args, "--tracking-uri", f"http://127.0.0.1:{port}", "--candidates", base / "cand",
                          "--out", out)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "MLflow is not reachable; the score job goes on" in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert f"tracking server http://127.0.0.1:{port} is unavailable" in last and \
        "The ranked lists and their summary are written" in last, last
    assert pq.read_metadata(out).num_rows == sum(pq.read_metadata(f).num_rows for f in (base / "cand").rglob("*.parquet"))


def test_quarantined_candidates_are_counted(base):
    cfg = yaml.safe_load((base / "job.yaml").read_text())
    cfg["score"]["on_bad_row"] = "quarantine"
    (base / "quarantine.yaml").write_text(yaml.safe_dump(cfg))

    def broken(t):
        items = t["item_id"].to_pylist()
        items[5] = None
        t = t.set_column(t.schema.get_field_index("item_id"), "item_id", pa.array(items, pa.int64()))
        return pa.concat_tables([t, t.slice(10, 4)])  # 4 duplicate pairs
    path = _broken(base, "mixed", broken)
    out = base / "q-out.parquet"
    r = score(base, "--out", out, "--no-track", candidates=path, config="quarantine.yaml")
    assert r.returncode == 0, r.stderr
    s = json.loads((base / "q-out.parquet.summary.json").read_text())
    assert s["rejected_by_reason"] == {"item_id:null": 1, "item_id:duplicate_in_request": 4}
    assert s["rows_read"] == s["rows_in"] + s["rows_rejected"] == pq.read_metadata(path).num_rows
    assert pq.read_metadata(out).num_rows == s["rows_in"]


def test_position_is_set_by_serving_and_read_by_evaluation(base):
    """The spec's `position` has `serve_value: 0`: candidates and serving requests need no position
    column, and one they carry is overridden (every candidate is ranked as if in the top slot); the
    training and evaluation path reads the logged slot, whose effect the model learnt."""
    from mtrank.features.featurize import Featurizer
    from mtrank.jobs.tracking import open_model
    from mtrank.pipeline.evaluate import predict_rows

    cand = pq.read_table(base / "cand")
    assert set(cand["position"].to_pylist()) == {0}   # the generator's candidates: the top slot
    at_seven = cand.set_column(cand.schema.get_field_index("position"), "position",
                               pa.array(np.full(cand.num_rows, 7, np.int16)))
    ranked = {}
    for name, table in (("logged", cand), ("absent", cand.drop(["position"])), ("seventh", at_seven)):
        pq.write_table(table, base / f"pos-{name}.parquet")
        r = score(base, "--out", base / f"pos-{name}-out.parquet", "--no-track", candidates=base / f"pos-{name}.parquet")
        assert r.returncode == 0, r.stderr
        ranked[name] = pl.read_parquet(base / f"pos-{name}-out.parquet").sort("request_id", "item_id")
    for name in ("absent", "seventh"):
        assert ranked[name]["p_ctr"].equals(ranked["logged"]["p_ctr"]) and ranked[name]["rank"].equals(ranked["logged"]["rank"])

    uri = f"sqlite:///{(base / 'work' / 'mlflow.db').resolve()}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    pyfunc = mlflow.pyfunc.load_model("models:/ranker@champion")
    schema = pyfunc.metadata.get_input_schema()   # optional: a client may send it (overridden) or not
    assert schema.required_input_names() == [n for n in schema.input_names() if n != "position"]
    assert "position" in schema.optional_input_names()
    sample = cand.slice(0, 200)
    served = pyfunc.predict(sample.drop(["position"]).to_pandas())["p_ctr"].to_numpy()
    import logging

    warned = []
    handler = logging.Handler()
    handler.emit = lambda record: warned.append(record.getMessage())
    logging.getLogger("mlflow.models.utils").addHandler(handler)
    try:
        np.testing.assert_array_equal(served, pyfunc.predict(at_seven.slice(0, 200).to_pandas())["p_ctr"].to_numpy())
    finally:
        logging.getLogger("mlflow.models.utils").removeHandler(handler)
    assert not [w for w in warned if "position" in w], warned   # sent, accepted, overridden: no warning
    # the evaluation path reads the column: the top slot gives the served predictions, slot 7 others
    saved = open_model("models:/ranker@champion", uri)
    feat = Featurizer(saved.spec, saved.stats)
    np.testing.assert_allclose(predict_rows(saved.model, feat, sample)["p_ctr"], served, rtol=1e-6)
    lower = predict_rows(saved.model, feat, at_seven.slice(0, 200))["p_ctr"]
    assert np.abs(lower - served).max() > 1e-4


def test_evaluate_reports_the_auc_as_served(base, tmp_path):
    """With a serve_value feature the report also gives each binary figure's AUC on the same logged
    rows and labels with the feature at its served value: what ranking by the served scores achieves
    (the logged slot explains part of every logged click). Checked against the pyfunc, which serves."""
    from mtrank.pipeline.metrics import auc

    r = mtrank_in_process("evaluate", "--model", "models:/ranker@champion", "--config", base / "job.yaml",
                          "--date", DATE, "--out", tmp_path / "ev")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "as served (position = 0 on every row" in r.stdout, r.stdout
    report = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    served = report["meta"]["AUC as served"]
    assert served["set"] == {"position": 0} and {"ctr", "cvr", "ctcvr"} <= set(served)
    assert served["ctr"]["logged_auc"] == report["tasks"]["ctr"]["auc"]
    assert abs(served["ctr"]["auc"] - served["ctr"]["logged_auc"]) > 1e-4   # the slot carried part of it
    day = pq.read_table(base / "logs" / f"dt={DATE}")
    uri = f"sqlite:///{(base / 'work' / 'mlflow.db').resolve()}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    p_ctr = mlflow.pyfunc.load_model("models:/ranker@champion").predict(day.to_pandas())["p_ctr"].to_numpy()
    assert served["ctr"]["auc"] == pytest.approx(auc(p_ctr, day["click"].to_numpy()), abs=1e-5)

