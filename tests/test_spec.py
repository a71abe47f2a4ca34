"""FeatureSpec loading: the default spec, and clear errors that name the offending key."""
import copy

import pytest
import yaml

from mtrank.features.spec import SpecError, load_spec, parse_spec


@pytest.fixture
def raw():
    with open("features/default_spec.yaml") as f:
        return yaml.safe_load(f)


def test_default_spec_shape():
    spec = load_spec()
    assert len(spec.categorical) == 26 and len(spec.multi_hot) == 2 and len(spec.dense) == 8
    tabs = spec.embedding_tables
    assert tabs["category"].fields == ("category_id", "user_recent_categories")
    assert tabs["user_id"].buckets == 1048576 and tabs["category"].buckets == 131072 and tabs["user_id"].dim == 16
    assert [t.name for t in spec.tasks] == ["ctr", "cvr", "stay", "collect", "cart"]
    assert spec.space_label(spec.task_by_name["cvr"]) == "click"
    assert spec.space_label(spec.task_by_name["ctr"]) is None
    assert spec.fingerprint() == load_spec().fingerprint()


def test_spec_roundtrips_through_yaml(tmp_path):
    spec = load_spec()
    p = tmp_path / "s.yaml"
    p.write_text(spec.to_yaml())
    assert load_spec(p) == spec and load_spec(p).fingerprint() == spec.fingerprint()


@pytest.mark.parametrize("mutate, message", [
    (lambda r: r["features"][3].update(bukets=3), "features[3](user_level).bukets: unknown key"),
    (lambda r: r["features"][3].update(kind="cat"), "unknown kind 'cat'"),
    (lambda r: r.update(learning_rate=1), "learning_rate: unknown key"),
    (lambda r: r["features"].append(dict(r["features"][0])), "duplicate feature name 'user_id'"),
    (lambda r: r["features"].append({"name": "click", "kind": "numeric"}),
     "features.click: column is the label of task 'ctr'"),
    (lambda r: r["features"].append({"name": "true_p_click", "kind": "numeric", "fill": 0}),
     "features.true_p_click: column is the ground-truth column of task 'ctr'"),
    (lambda r: r["tasks"][1].update(parent="nope"), "tasks.cvr.parent: unknown task 'nope'"),
    (lambda r: r["tasks"][1].update(space="all"), "entire-space child must be trained on its parent"),
    (lambda r: r["tasks"][2].update(loss="bce"), "regression task needs loss"),
    (lambda r: r["features"][7].update(table="nope"), "features.category_id.table: unknown table 'nope'"),
    (lambda r: r["features"][0].pop("buckets"), "features.user_id.buckets: required"),
    (lambda r: r["features"][7].update(buckets=9), "set buckets/dim on table 'category'"),
    (lambda r: r["features"][-1].update(clip=[1.0, 0.0]), "clip lower bound"),
    (lambda r: r["features"][-1].update(boundaries=[0.5, 0.1], standardize=False), "strictly increasing"),
    (lambda r: r.update(on_bad_row="ignore"), "on_bad_row"),
    (lambda r: r["ground_truth"].update(ltv="true_ltv"), "ground_truth.ltv: unknown task"),
    # MLflow refuses '?' in a metric name: caught at load, not after training
    (lambda r: r["tasks"][0].update(name="ctr?"), "'ctr?' is not a task name: letters, digits"),
    (lambda r: r["tasks"][1].update(product="ct/cvr"), "'ct/cvr' is not a task name"),
    # serve_value: an id for a categorical, a finite number for a numeric, nothing for a multi-hot
    (lambda r: r["features"][3].update(serve_value=1.5), "user_level).serve_value"),
    (lambda r: r["features"][3].update(serve_value=True), "serve_value: expected a number, got the boolean"),
    (lambda r: r["features"][-1].update(serve_value="top"), "(discount_rate).serve_value: Input should be a valid number"),
    (lambda r: r["features"][-1].update(serve_value=float("inf")), "serve_value: Input should be a finite number"),
    (lambda r: r["features"][26].update(serve_value="a"), "(user_recent_categories).serve_value: unknown key"),
])
def test_bad_specs_name_the_key(raw, mutate, message):
    bad = copy.deepcopy(raw)
    mutate(bad)
    with pytest.raises(SpecError) as e:
        parse_spec(bad, "my_spec.yaml")
    assert "my_spec.yaml" in str(e.value) and message in str(e.value)


def test_serve_value_names_the_serving_columns_and_enters_the_hash_only_when_set(raw):
    spec = parse_spec(raw, "default")
    assert spec.served_values == {"position": 0}
    assert "position" in spec.feature_columns and "position" not in spec.serving_columns
    unset = copy.deepcopy(raw)
    next(f for f in unset["features"] if f["name"] == "position").pop("serve_value")
    explicit = copy.deepcopy(unset)
    next(f for f in explicit["features"] if f["name"] == "position")["serve_value"] = None
    # a spec written before serve_value existed keeps its hash (resumes, caches, warm starts)
    assert parse_spec(unset, "a").fingerprint() == parse_spec(explicit, "b").fingerprint() != spec.fingerprint()
    assert parse_spec(unset, "a").serving_columns == spec.feature_columns


def test_unreadable_and_invalid_yaml(tmp_path):
    with pytest.raises(SpecError, match="cannot read"):
        load_spec(tmp_path / "missing.yaml")
    p = tmp_path / "bad.yaml"
    p.write_text("features: [\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(p)
    p.write_text("!!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(SpecError):  # safe_load refuses to construct Python objects
        load_spec(p)


def test_bucketized_numeric_gets_its_own_table(raw):
    r = copy.deepcopy(raw)
    r["features"].append({"name": "item_score", "kind": "numeric", "fill": 0.0, "boundaries": [0.1, 0.5], "dim": 4})
    spec = parse_spec(r)
    tab = spec.embedding_tables["item_score"]
    assert tab.buckets == 4 and tab.dim == 4 and spec.dense[-1].name != "item_score"
