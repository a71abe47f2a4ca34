"""Id embeddings that generalise: frequency admission, per-table L2, embedding dropout, spec checks."""
import datetime as dt

import numpy as np
import polars as pl
import pytest
import torch

from mtrank.features.admission import IdCounts, admission_tables
from mtrank.features.featurize import Featurizer
from mtrank.features.hashing import hash_value
from mtrank.features.spec import SpecError, parse_spec
from mtrank.models import ModelConfig, MultiTaskRanker
from mtrank.models.embedding import FusedEmbeddings
from mtrank.pipeline.batch import batch_from_arrays
from mtrank.pipeline.optim import sparse_optimizer

DAY = dt.date(2026, 11, 1)
SMALL = {"experts": 2, "expert_mlp": [8], "tower_mlp": [4]}

# user u1 x3, u2 x2, u3 x1; tags: a x4 (rows 0,1,2,5), b x2, c x1; categories: z x3, a x1, y x1, null
USERS = ["u1", "u1", "u1", "u2", "u2", "u3"]
TAGS = [["a", "b"], ["a"], ["a", "c"], [], None, ["a", "b"]]
CATS = ["a", "z", "z", "z", "y", None]


def spec_dict(**user_opts) -> dict:
    return {
        "hash_seed": 7, "embedding_dim": 4, "group_key": None, "request_id": None, "timestamp": None,
        "tables": {"shared": {"buckets": 4096, "min_count": 3}},
        "features": [{"name": "user", "kind": "categorical", "buckets": 4096, "min_count": 2, **user_opts},
                     {"name": "tags", "kind": "multi_hot", "table": "shared"},
                     {"name": "cat", "kind": "categorical", "table": "shared"},
                     {"name": "age", "kind": "numeric", "fill": 0.0}],
        "tasks": [{"name": "click", "label": "click", "type": "binary"}]}


def frame(users=USERS, tags=TAGS, cats=CATS) -> pl.DataFrame:
    n = len(users)
    return pl.DataFrame({"user": users, "tags": tags, "cat": cats, "age": [float(i) for i in range(n)],
                         "click": [i % 2 for i in range(n)]},
                        schema={"user": pl.String, "tags": pl.List(pl.String), "cat": pl.String, "age": pl.Float64,
                                "click": pl.Int8})


def ids(table: str, values) -> set[int]:
    return {hash_value(v, table, 7, 4096) for v in values}


def test_admission_remaps_exactly_the_ids_under_min_count():
    spec = parse_spec(spec_dict())
    assert admission_tables(spec) == ["user", "shared"]
    tabs = spec.embedding_tables
    assert (tabs["user"].rows, tabs["user"].rare_id, tabs["shared"].rows) == (4097, 4096, 4097)
    arrays = Featurizer(spec).transform(frame())
    counts = IdCounts.of_arrays(arrays, spec)
    admitted = counts.admitted(spec)
    # by hand: user min_count 2 -> u1 (3), u2 (2) keep rows, u3 (1) does not; shared min_count 3 counts the
    # bag values and the category together: a 4+1 = 5, z 3 keep rows; b 2, c 1, y 1 do not.
    assert set(np.flatnonzero(admitted["user"])) == {0} | ids("user", ["u1", "u2"])
    assert set(np.flatnonzero(admitted["shared"])) == {0} | ids("shared", ["a", "z"])
    assert counts.counts["shared"][hash_value("a", "shared", 7, 4096)] == 5
    # validate's path (hashing raw rows in polars) counts the same as training's (featurized arrays)
    raw = IdCounts.of_frame(frame(), spec, ["user", "shared"])
    for t in ("user", "shared"):
        np.testing.assert_array_equal(raw.counts[t], counts.counts[t])
    s = counts.summary(spec)
    assert s["user"] | {} == {"min_count": 2, "ids_seen": 3, "ids_rare": 1, "ids_admitted": 2, "lookups": 6,
                              "lookups_rare": 1, "ids_once": 1}
    assert (s["shared"]["ids_seen"], s["shared"]["ids_rare"], s["shared"]["lookups_rare"]) == (5, 3, 4)

    # the model: every lookup of a rare or never-seen id reads the rare row; admitted ids their own
    torch.manual_seed(0)
    emb = FusedEmbeddings(spec).eval()
    emb.set_admission(admitted)
    test = frame(users=["u1", "u3", "never-seen", None], tags=[["a"], ["b"], ["q"], None], cats=["z", "y", "q", None])
    out = emb(batch_from_arrays(Featurizer(spec).transform(test)))
    w = emb.weights[0]
    user, cat, tags = (out[:, emb.field_slices[f]] for f in ("user", "cat", "tags"))
    rare_u, rare_s = w[emb.rare_row["user"]], w[emb.rare_row["shared"]]
    base_u, base_s = emb.table_base["user"], emb.table_base["shared"]
    torch.testing.assert_close(user[0], w[base_u + hash_value("u1", "user", 7, 4096)])
    torch.testing.assert_close(user[1], rare_u)
    torch.testing.assert_close(user[2], rare_u)
    torch.testing.assert_close(user[3], w[base_u])             # null keeps the null row
    torch.testing.assert_close(cat[0], w[base_s + hash_value("z", "shared", 7, 4096)])
    torch.testing.assert_close(cat[1], rare_s)
    torch.testing.assert_close(tags[1], rare_s)                # a rare bag value too (mean of one)
    torch.testing.assert_close(tags[2], rare_s)


def _write_days(root, days: int = 2) -> None:
    for d in range(days):
        part = root / f"dt={DAY + dt.timedelta(days=d)}"
        part.mkdir(parents=True)
        frame().write_parquet(part / "part-0.parquet")


def test_validate_counts_ids_under_min_count(tmp_path):
    from mtrank.jobs.validate import format_report, validate

    spec = parse_spec(spec_dict())
    _write_days(tmp_path, days=1)
    report = validate(tmp_path, spec, progress=False)
    c = report["id_counts"]
    assert (c["user"]["ids_seen"], c["user"]["ids_rare"], c["user"]["lookups_rare"]) == (3, 1, 1)
    assert (c["shared"]["ids_rare"], c["shared"]["lookups_rare"], c["shared"]["min_count"]) == (3, 4, 3)
    text = format_report(report)
    assert "under min_count" in text and "rare ids" in text


def test_admission_is_fitted_by_training_saved_with_the_model_and_applied_when_scoring(tmp_path, monkeypatch):
    """`mtrank train` (in process) counts on the training window only, reports it, and the saved model
    gives a scored row of a rare id the rare row's embedding. The count is the memory feature cache's
    filling pass: two epochs read the training window once."""
    import yaml

    from mtrank.pipeline.reader import ImpressionReader

    passes: list[str] = []
    keyed = ImpressionReader.keyed_featurized

    def counted(self, epoch):
        passes.append("train" if self.cache is not None and self.cache.directory is not None else "other")
        return keyed(self, epoch)

    monkeypatch.setattr(ImpressionReader, "keyed_featurized", counted)
    from mtrank.jobs.config import JobConfig
    from mtrank.jobs.model_io import load_model
    from mtrank.jobs.train import train
    from mtrank.pipeline.evaluate import predict_rows

    _write_days(tmp_path / "logs", days=3)   # 2 training days (each id's count doubles), 1 evaluation day
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec_dict(min_count=5)))
    cfg = JobConfig.model_validate({"name": "ids", "data": str(tmp_path / "logs"), "spec": str(tmp_path / "spec.yaml"),
                                    "window_days": 2, "work_dir": str(tmp_path / "work"), "model": SMALL,
                                    "train": {"epochs": 2, "batch_size": 4, "min_rows": 1}})
    outcome = train(cfg, DAY + dt.timedelta(days=2))
    assert passes.count("train") == 1, passes
    assert outcome.summary["rows"]["read"] == outcome.summary["rows"]["trained"] == 2 * 12   # 2 epochs x 12 rows
    adm = outcome.summary["id_admission"]
    # over two days: u1 6, u2 4, u3 2 lookups; min_count 5 admits u1 only
    assert (adm["user"]["ids_seen"], adm["user"]["ids_admitted"], adm["user"]["lookups_rare"]) == (3, 1, 6)
    saved = load_model(outcome.run_dir / "model")
    assert set(np.flatnonzero(saved.model.embeddings.admitted("user").numpy())) == {0} | ids("user", ["u1"])
    emb = saved.model.embeddings
    fz = Featurizer(saved.spec, saved.stats)
    rows = frame(users=["u2", "u3", "brand-new"], tags=[["a"]] * 3, cats=["z"] * 3).drop("click").to_arrow()
    out = emb(batch_from_arrays(fz.transform(rows, with_labels=False)))[:, emb.field_slices["user"]]
    for r in range(3):
        torch.testing.assert_close(out[r], emb.weights[0][emb.rare_row["user"]])
    # two rows that differ only in a rare vs a never-seen user score the same
    same = frame(users=["u2", "brand-new"], tags=[["a"]] * 2, cats=["z"] * 2).drop("click").with_columns(
        age=pl.lit(1.0)).to_arrow()
    p = predict_rows(saved.model, fz, same)["p_click"]
    assert p[0] == p[1]


def _l2_spec(l2_user: float) -> dict:
    d = spec_dict(l2=l2_user)
    d["tables"]["shared"]["min_count"] = 1
    d["features"][0]["min_count"] = 1
    return d


@pytest.mark.parametrize("kind", ["rowwise_adagrad", "adam"])
def test_l2_shrinks_only_touched_rows_of_its_table(kind):
    spec = parse_spec(_l2_spec(0.5))
    torch.manual_seed(0)
    emb = FusedEmbeddings(spec)
    w = emb.weights[0]
    before = w.detach().clone()
    user_rows = torch.tensor([3, 9]) + emb.table_base["user"]
    shared_rows = torch.tensor([5]) + emb.table_base["shared"]
    touched = torch.cat([user_rows, shared_rows])
    # a zero gradient on the touched rows: only L2 can move them
    w.grad = torch.sparse_coo_tensor(touched.unsqueeze(0), torch.zeros(3, 4), w.shape)
    opt = sparse_optimizer(emb.sparse_parameters(), kind, lr=1e-4, row_l2=emb.row_l2())   # steps below |w| ~ 0.01
    opt.step()
    after = w.detach()
    untouched = torch.ones(w.shape[0], dtype=torch.bool)
    untouched[user_rows] = False
    assert torch.equal(after[untouched], before[untouched])           # bit-identical, shared row 5 included
    assert (after[user_rows].norm(dim=1) < before[user_rows].norm(dim=1)).all()
    assert torch.equal(after[shared_rows], before[shared_rows])        # l2 0 on its table
    # without l2 nothing moves at all
    emb2 = FusedEmbeddings(parse_spec(_l2_spec(0.0)))
    assert emb2.row_l2() == {}


def test_dropout_only_in_training_and_deterministic_for_a_seed():
    d = _l2_spec(0.0)
    d["features"][0].update(min_count=2, dropout=0.5)
    spec = parse_spec(d)
    n = 400
    users = [f"u{i % 50}" for i in range(n)]
    users[0] = None
    big = frame(users=users, tags=[["a"]] * n, cats=["z"] * n)
    fz = Featurizer(spec)
    batch = batch_from_arrays(fz.transform(big))
    torch.manual_seed(1)
    emb = FusedEmbeddings(spec)
    emb.set_admission(IdCounts.of_arrays(fz.transform(big), spec, ["user"]).admitted(spec))  # every user admitted
    sl = emb.field_slices["user"]
    rare = emb.weights[0][emb.rare_row["user"]]
    with torch.no_grad():
        emb.eval()
        plain = emb(batch)[:, sl]
        assert not torch.isclose(plain, rare).all(1).any()     # evaluation: no id dropped
        emb.train()
        torch.manual_seed(5)
        a = emb(batch)[:, sl]
        torch.manual_seed(5)
        b = emb(batch)[:, sl]
        c = emb(batch)[:, sl]
    assert torch.equal(a, b) and not torch.equal(a, c)
    dropped = torch.isclose(a, rare).all(1)
    assert 0.35 < dropped.float().mean() < 0.65
    assert not dropped[0]                                    # the null id is never dropped
    torch.testing.assert_close(a[~dropped], plain[~dropped])


def test_ranker_state_dict_holds_admission_only_when_a_table_has_it():
    spec = parse_spec(spec_dict())
    keys = MultiTaskRanker(spec, ModelConfig(**SMALL)).state_dict()
    assert "embeddings.admit0" in keys and keys["embeddings.admit0"].dtype == torch.bool
    plain = parse_spec(_l2_spec(0.0))
    assert not any("admit" in k for k in MultiTaskRanker(plain, ModelConfig(**SMALL)).state_dict())


@pytest.mark.parametrize("change, message", [
    (lambda d: d["features"][1].update(min_count=2), "features[1](tags): min_count: set on table 'shared'"),
    (lambda d: d["features"][2].update(l2=1e-5, dropout=0.1), "l2, dropout: set on table 'shared'"),
    (lambda d: d["features"][0].update(min_count=0), "features[0](user).min_count: Input should be greater than"),
    (lambda d: d["features"][0].update(dropout=1.0), "features[0](user).dropout: Input should be less than 1"),
    (lambda d: d["tables"]["shared"].update(l2=-1.0), "tables.shared.l2: Input should be greater than or equal"),
    (lambda d: d["tables"]["shared"].update(l2=float("nan")), "tables.shared.l2: Input should be a finite number"),
    (lambda d: d["tables"]["shared"].update(min_cout=2), "tables.shared.min_cout: unknown key"),
])
def test_spec_rejects_bad_id_options(change, message):
    d = spec_dict()
    change(d)
    with pytest.raises(SpecError) as e:
        parse_spec(d, "s.yaml")
    assert message in str(e.value), str(e.value)


def test_init_spec_proposes_admission_for_high_cardinality_ids_only(tmp_path):
    import yaml

    from mtrank.features.infer_spec import ID_MIN_DISTINCT, ID_OPTIONS, InferOptions, infer_spec

    n = 3 * ID_MIN_DISTINCT
    rng = np.random.default_rng(0)
    part = tmp_path / "dt=2026-11-01"
    part.mkdir()
    pl.DataFrame({"user_id": rng.integers(0, 2 * ID_MIN_DISTINCT, n),          # ~ID_MIN_DISTINCT * 1.5 distinct
                  "item_id": rng.integers(0, ID_MIN_DISTINCT // 5, n),         # few distinct: an ordinary categorical
                  "click": rng.integers(0, 2, n).astype(np.int8)}).write_parquet(part / "part-0.parquet")
    got = infer_spec(tmp_path, InferOptions(tasks=[("click", "click")]))
    spec = parse_spec(yaml.safe_load(got.text))
    by = spec.feature_by_name
    assert {k: getattr(by["user_id"], k) for k in ID_OPTIONS} == ID_OPTIONS
    assert by["item_id"].min_count == 1 and "min_count" not in got.text.split("item_id")[-1].split("\n")[0]


def test_id_biases_share_the_tables_admission_and_warm_start():
    """`esmm.id_bias`: the children's per-id biases use the tables' rows and admission (a rare id reads
    the rare row's bias), and a warm start copies them table by table (a re-initialised table's
    biases start again at zero)."""
    from mtrank.models.warm_start import transfer_weights

    raw = spec_dict()
    raw["tasks"] = [{"name": "click", "label": "click", "type": "binary"},
                    {"name": "buy", "label": "click", "type": "binary", "parent": "click", "space": "click"}]
    spec = parse_spec(raw)
    cfg = ModelConfig(**SMALL, esmm={"tower_loss": "clicked", "tower_scope": "dense", "id_bias": 0.5})
    torch.manual_seed(0)
    model = MultiTaskRanker(spec, cfg)
    model.set_admission(IdCounts.of_arrays(Featurizer(spec).transform(frame()), spec).admitted(spec))
    for name in ("user", "shared"):
        assert torch.equal(model.id_biases.admitted(name), model.embeddings.admitted(name))
    assert not bool(model.id_biases.admitted("user")[hash_value("u3", "user", 7, 4096)])
    with torch.no_grad():
        model.id_biases.weights[0].normal_()
    test = batch_from_arrays(Featurizer(spec).transform(
        frame(users=["u3", "never-seen", "u1"], tags=[None] * 3, cats=[None] * 3)))
    model.eval()
    e = model.id_biases
    b = model.id_bias(test)[:, 0]
    assert torch.equal(b[0], b[1])                    # both users read the rare row's bias
    w = e.weights[0][:, 0]
    u1 = e.table_base["user"] + hash_value("u1", "user", 7, 4096)
    assert float(b[2] - b[0]) == pytest.approx(0.5 * float(w[u1] - w[e.rare_row["user"]]), abs=1e-6)

    child = MultiTaskRanker(spec, cfg)
    transfer_weights(model, child, frozenset(["shared"]))
    ce = child.id_biases
    u = slice(e.table_base["user"], e.table_base["user"] + spec.embedding_tables["user"].rows)
    s = slice(ce.table_base["shared"], ce.table_base["shared"] + spec.embedding_tables["shared"].rows)
    assert torch.equal(ce.weights[0][u], e.weights[0][u])
    assert not ce.weights[0][s].any() and e.weights[0][s].any()
