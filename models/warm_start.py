"""Continue from a parent model: copy its weights into a freshly built child, table by table.

Tables named in `reinit` keep the child's fresh initialisation (their ids now mean something else);
every other table's rows are copied from wherever the parent stacked them, and so are its per-id
biases (`esmm.id_bias`). Dense layers are copied as they are: the caller has checked that inputs and
architecture did not change.
"""
from __future__ import annotations

import torch

from mtrank.models.embedding import FusedEmbeddings
from mtrank.models.ranker import MultiTaskRanker


@torch.no_grad()
def transfer_weights(parent: MultiTaskRanker, child: MultiTaskRanker, reinit: frozenset[str] = frozenset()) -> None:
    if parent.cfg != child.cfg:
        raise ValueError("parent and child models have different architectures")
    tables = tuple(f"{name}.weights." for name, m in child.named_children() if m in child.lookups())
    dense = {k: v for k, v in parent.state_dict().items()   # calibration is refitted for the child's data
             if not k.startswith(tables) and k != "calibration"}
    missing, unexpected = child.load_state_dict(dense, strict=False)
    if unexpected or any(not k.startswith(tables) for k in missing):
        raise ValueError(f"parent and child layers differ: missing {missing}, unexpected {unexpected}")
    for pe, ce in zip(parent.lookups(), child.lookups()):   # the embeddings, then the per-id biases
        for name, base in ce.table_base.items():
            if name in reinit:
                continue
            if name not in pe.table_base or pe.table_dim[name] != ce.table_dim[name]:
                raise ValueError(f"table {name!r} cannot be copied from the parent")
            rows = table_rows(ce, name)
            if rows != table_rows(pe, name):
                raise ValueError(f"table {name!r} has {table_rows(pe, name)} rows in the parent, {rows} now")
            src = pe.weights[pe.dims.index(pe.table_dim[name])]
            dst = ce.weights[ce.dims.index(ce.table_dim[name])]
            dst[base:base + rows].copy_(src[pe.table_base[name]:pe.table_base[name] + rows])


def table_rows(model: MultiTaskRanker | FusedEmbeddings, table: str) -> int:
    """Rows of `table` in the stacked weight of a model's embeddings (or of one lookup module)."""
    e = model.embeddings if isinstance(model, MultiTaskRanker) else model
    dim = e.table_dim[table]
    starts = sorted(b for t, b in e.table_base.items() if e.table_dim[t] == dim)
    mine = e.table_base[table]
    later = [s for s in starts if s > mine]
    return (later[0] if later else e.weights[e.dims.index(dim)].shape[0]) - mine
