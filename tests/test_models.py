import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from mtrank.features.spec import load_spec, parse_spec
from mtrank.models import BatchedMLP, FusedEmbeddings, ModelConfig, MultiTaskRanker
from mtrank.models.batch import Batch, TableInput
from mtrank.pipeline.batch import batch_from_arrays

SMALL = {
    "hash_seed": 1,
    "embedding_dim": 4,
    "tables": {"category": {"buckets": 20, "dim": 4}},
    "features": [
        {"name": "user_id", "kind": "categorical", "buckets": 50},
        {"name": "item_id", "kind": "categorical", "buckets": 30, "dim": 8},
        {"name": "category_id", "kind": "categorical", "table": "category"},
        {"name": "recent_categories", "kind": "multi_hot", "table": "category", "pooling": "mean"},
        {"name": "tags", "kind": "multi_hot", "buckets": 40, "dim": 8, "pooling": "sum"},
        {"name": "price", "kind": "numeric", "fill": 0.0, "boundaries": [1.0, 10.0], "dim": 2},
        {"name": "age", "kind": "numeric", "fill": 0.0},
        {"name": "score", "kind": "numeric", "fill": 0.0},
    ],
    "tasks": [
        {"name": "ctr", "label": "click", "type": "binary"},
        {"name": "cvr", "label": "conversion", "type": "binary", "space": "ctr", "parent": "ctr"},
        {"name": "stay", "label": "stay_seconds", "type": "regression", "loss": "mse_log1p", "space": "ctr"},
        {"name": "cart", "label": "cart", "type": "binary", "space": "ctr", "parent": "ctr"},
    ],
}
TINY = dict(experts=3, expert_mlp=(16, 8), tower_mlp=(4,))


@pytest.fixture(scope="module")
def small():
    return parse_spec(SMALL)


def make_batch(spec, b, seed=0, weighted=True):
    g = torch.Generator().manual_seed(seed)
    tabs = spec.embedding_tables
    ids = torch.stack([torch.randint(0, tabs[t].buckets, (b,), generator=g) for _, t in spec.id_fields], 1) \
        if spec.id_fields else torch.zeros(b, 0, dtype=torch.long)
    bags = {}
    for name, fields in spec.bag_tables.items():
        lens = torch.randint(0, 4, (b * len(fields),), generator=g)
        offsets = torch.cumsum(lens, 0) - lens
        values = torch.randint(0, tabs[name].buckets, (int(lens.sum()),), generator=g)
        w = torch.rand(values.numel(), generator=g) if weighted else None
        bags[name] = TableInput(values, offsets, w)
    dense = torch.randn(b, len(spec.dense), generator=g)
    return Batch(b, ids, bags, dense, {}, {}, None, {})


def test_config_strict_and_frozen():
    with pytest.raises(ValidationError):
        ModelConfig(botom="mmoe")
    with pytest.raises(ValidationError):
        ModelConfig(bottom="moe")
    cfg = ModelConfig()
    with pytest.raises(ValidationError):
        cfg.experts = 3


@pytest.mark.parametrize("bottom", ["shared_bottom", "omoe", "mmoe", "ple"])
def test_output_shapes_all_bottoms(small, bottom):
    model = MultiTaskRanker(small, ModelConfig(bottom=bottom, **TINY))
    out = model(make_batch(small, 7))
    assert set(out.logits) == {"ctr", "cvr", "stay", "cart"}
    assert set(out.predictions) == {"p_ctr", "p_cvr", "p_ctr_cvr", "stay", "p_cart", "p_ctr_cart"}
    assert list(out.predictions) == list(small.outputs.names)
    for k, v in out.predictions.items():
        assert v.shape == (7,), k
    assert set(out.log_products) == {"cvr", "cart"} and all(v.shape == (7,) for v in out.log_products.values())
    assert (out.predictions["stay"] >= 0).all()
    gates = out.gates
    if bottom == "shared_bottom":
        assert gates is None
    else:
        width = 3 if bottom != "ple" else 3 + 1
        assert all(g.shape == (7, width) for g in gates.values())
        for g in gates.values():
            torch.testing.assert_close(g.sum(1), torch.ones(7))


def test_default_spec_outputs():
    spec = load_spec()
    model = MultiTaskRanker(spec, ModelConfig(**TINY))
    emb = model.embeddings
    n_id, n_bag = len(spec.id_fields), sum(len(f) for f in spec.bag_tables.values())
    assert emb.output_dim == 16 * (n_id + n_bag) + len(spec.dense)
    out = model(make_batch(spec, 5))
    for k in ("p_ctr", "p_cvr", "p_ctcvr", "p_collect", "p_ctcollect", "p_cart", "p_ctcart", "stay"):
        assert out.predictions[k].shape == (5,)
    assert spec.outputs.product("cvr").figure == "ctcvr"   # the demo spec names its products
    # esmm only changes how children are trained; the products are outputs either way
    assert "p_ctcvr" in MultiTaskRanker(spec, ModelConfig(esmm=False, **TINY))(make_batch(spec, 2)).predictions


def test_featurizer_batch_end_to_end(spec):
    """A Batch from the real Featurizer (nulls, empty bags, mean-pool weights) runs and backprops."""
    from tests.conftest import make_frame
    from mtrank.features.featurize import Featurizer
    from mtrank.features.numeric import NumericStats

    df = make_frame(spec, 12)
    batch = batch_from_arrays(Featurizer(spec, NumericStats.of_frame(df, spec)).transform(df))
    model = MultiTaskRanker(spec, ModelConfig(bottom="ple", **TINY))
    out = model(batch)
    assert out.predictions["p_ctcvr"].shape == (12,) and torch.isfinite(out.log_products["cvr"]).all()
    out.log_products["cvr"].sum().backward()
    assert all(p.grad.is_sparse for p in model.sparse_parameters())


def test_esmm_product_and_stable_log(small):
    model = MultiTaskRanker(small, ModelConfig(**TINY))
    out = model(make_batch(small, 9))
    torch.testing.assert_close(out.predictions["p_ctr_cvr"], out.predictions["p_ctr"] * out.predictions["p_cvr"])
    torch.testing.assert_close(out.log_products["cvr"], torch.log(out.predictions["p_ctr_cvr"]))
    with torch.no_grad():  # force every logit to -100
        model.towers.weights[-1].zero_()
        model.towers.biases[-1].fill_(-100.0)
    out = model(make_batch(small, 9))
    assert torch.isfinite(out.log_products["cvr"]).all()
    torch.testing.assert_close(out.log_products["cvr"], torch.full((9,), -200.0))
    out.log_products["cvr"].sum().backward()
    assert torch.isfinite(model.towers.biases[-1].grad).all()


def test_shared_table_same_rows(small):
    emb = FusedEmbeddings(small)
    cat_col = [f for f, _ in small.id_fields].index("category_id")
    ids = torch.zeros(1, len(small.id_fields), dtype=torch.long)
    ids[0, cat_col] = 5
    bags = {"category": TableInput(torch.tensor([5]), torch.tensor([0]), torch.tensor([1.0])),
            "tags": TableInput(torch.tensor([3]), torch.tensor([0]), None)}
    batch = Batch(1, ids, bags, torch.zeros(1, len(small.dense)), {}, {}, None, {})
    x = emb(batch)
    id_vec = x[0, emb.field_slices["category_id"]]
    bag_vec = x[0, emb.field_slices["recent_categories"]]
    assert emb.field_slices["category_id"] != emb.field_slices["recent_categories"]
    torch.testing.assert_close(id_vec, bag_vec)
    # Gradient of each lookup lands on the same row of the same weight.
    w = emb.weights[emb.dims.index(4)]
    id_vec.sum().backward(retain_graph=True)
    rows_id = {int(r) for r, v in zip(w.grad.coalesce().indices()[0], w.grad.coalesce().values()) if v.abs().sum() > 0}
    w.grad = None
    bag_vec.sum().backward()
    rows_bag = {int(r) for r, v in zip(w.grad.coalesce().indices()[0], w.grad.coalesce().values()) if v.abs().sum() > 0}
    assert rows_id == rows_bag == {emb.table_base["category"] + 5}


def test_sparse_and_dense_grads(small):
    model = MultiTaskRanker(small, ModelConfig(bottom="ple", **TINY))
    out = model(make_batch(small, 6))
    (sum(v.sum() for v in out.logits.values())).backward()
    sparse = model.sparse_parameters()
    assert len(sparse) == 3  # dims 2, 4, 8
    for p in sparse:
        assert p.grad is not None and p.grad.is_sparse
    dense = model.dense_parameters()
    assert len(dense) + len(sparse) == len(list(model.parameters()))
    for p in dense:
        assert p.grad is not None and not p.grad.is_sparse
    # The split is what a trainer needs: SparseAdam on tables, Adam on the rest.
    torch.optim.SparseAdam(sparse).step()
    torch.optim.Adam(dense).step()


def test_mmoe_gates_differ_per_task(small):
    model = MultiTaskRanker(small, ModelConfig(bottom="mmoe", **TINY))
    gates = model(make_batch(small, 8)).gates
    for g in gates.values():
        torch.testing.assert_close(g.sum(1), torch.ones(8))
    assert not torch.allclose(gates["ctr"], gates["cvr"])


def test_batched_mlp_equals_loop():
    torch.manual_seed(0)
    mlp = BatchedMLP(5, 6, (7, 3), last_activation=False)
    x = torch.randn(4, 6)
    xs = torch.randn(5, 4, 6)
    for inp in (x, xs):
        got = mlp(inp)
        for e in range(5):
            h = inp if inp.dim() == 2 else inp[e]
            h = F.relu(h @ mlp.weights[0][e] + mlp.biases[0][e])
            h = h @ mlp.weights[1][e] + mlp.biases[1][e]
            torch.testing.assert_close(got[e], h)


def test_ple_matches_reference_loop(small):
    """PLE's batched level equals a per-expert, per-task loop with the same weights."""
    torch.manual_seed(0)
    model = MultiTaskRanker(small, ModelConfig(bottom="ple", ple_levels=2, ple_task_experts=2, **TINY))
    x = torch.randn(5, model.embeddings.output_dim)
    got, gates = model.bottom(x)
    T, Et, Es = 4, 2, 3

    def expert(lvl, i, h):
        m = lvl.experts
        for w, b in zip(m.weights, m.biases):
            h = F.relu(h @ w[i] + b[i])
        return h

    task_in, shared_in = [x] * T, x
    for lvl in model.bottom.levels:
        outs = [[expert(lvl, t * Et + j, task_in[t]) for j in range(Et)] for t in range(T)]
        shared = [expert(lvl, T * Et + j, shared_in) for j in range(Es)]
        new = []
        for t in range(T):
            gw, gb = lvl.task_gates.mlp.weights[0][t], lvl.task_gates.mlp.biases[0][t]
            g = torch.softmax(task_in[t] @ gw + gb, -1)
            new.append(sum(g[:, k:k + 1] * e for k, e in enumerate(outs[t] + shared)))
        if lvl.shared_gate is not None:
            gs = torch.softmax(lvl.shared_gate(shared_in), -1)
            flat = [e for o in outs for e in o] + shared
            shared_in = sum(gs[:, k:k + 1] * e for k, e in enumerate(flat))
        task_in = new
    for t in range(T):
        torch.testing.assert_close(got[t], task_in[t])


def test_tiny_model_learns(small):
    torch.manual_seed(0)
    model = MultiTaskRanker(small, ModelConfig(bottom="mmoe", **TINY))
    uid = [f for f, _ in small.id_fields].index("user_id")
    opt_s = torch.optim.SparseAdam(model.sparse_parameters(), lr=0.05)
    opt_d = torch.optim.Adam(model.dense_parameters(), lr=0.01)
    losses = []
    for step in range(200):
        batch = make_batch(small, 128, seed=step)
        y = (batch.ids[:, uid] % 3 == 0).float()  # click iff user id in a subset
        loss = F.binary_cross_entropy_with_logits(model(batch).logits["ctr"], y)
        opt_s.zero_grad(), opt_d.zero_grad()
        loss.backward()
        opt_s.step(), opt_d.step()
        losses.append(loss.item())
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert first > 0.55 and last < 0.2, (first, last)
