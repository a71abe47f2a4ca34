"""Fused embedding lookups: one weight per embedding dim, one lookup call per group, not per field.

All tables of one dim are stacked into a single weight with per-table row offsets, so every id
column of that dim is looked up in one `F.embedding` and every bag table in one `F.embedding_bag`.
A table used by both an id column and a bag (e.g. `category`) is one row range of one weight, so
both read and update the same rows. Lookups are `sparse=True`: the tables are huge and a step
touches few rows, so a trainer should give `sparse_parameters()` to SparseAdam.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mtrank.features.spec import FeatureSpec
from mtrank.models.batch import Batch


class FusedEmbeddings(nn.Module):
    """Batch -> [B, output_dim]: all id-field embeddings, pooled bags (flattened), then dense."""

    def __init__(self, spec: FeatureSpec, init_std: float = 0.01):
        super().__init__()
        tables = spec.embedding_tables
        dims = sorted({t.dim for t in tables.values()})
        self.dims = tuple(dims)
        base: dict[str, int] = {}
        rows = {d: 0 for d in dims}
        for t in tables.values():
            base[t.name] = rows[t.dim]
            rows[t.dim] += t.buckets
        self.table_dim = {name: t.dim for name, t in tables.items()}
        self.table_base = dict(base)
        self.weights = nn.ParameterList(
            nn.Parameter(torch.empty(rows[d], d).normal_(0.0, init_std)) for d in dims)  # in place: no 2nd copy
        # Id columns grouped by dim: which columns of Batch.ids, and the row base to add to each.
        self._id_groups: list[tuple[int, str, str]] = []  # (dim index, cols buffer, base buffer)
        for gi, d in enumerate(dims):
            cols = [i for i, (_, tab) in enumerate(spec.id_fields) if tables[tab].dim == d]
            if not cols:
                continue
            self.register_buffer(f"_cols{gi}", torch.tensor(cols, dtype=torch.long), persistent=False)
            self.register_buffer(f"_base{gi}", torch.tensor([base[spec.id_fields[c][1]] for c in cols],
                                                            dtype=torch.long), persistent=False)
            self._id_groups.append((gi, f"_cols{gi}", f"_base{gi}"))
        self.bag_tables = {name: len(fields) for name, fields in spec.bag_tables.items()}
        self.n_dense = len(spec.dense)
        # Where each field lands in the output row (same order as forward concatenates).
        self.field_slices: dict[str, slice] = {}
        pos = 0
        for gi, d in enumerate(dims):
            for f, tab in spec.id_fields:
                if tables[tab].dim == d:
                    self.field_slices[f], pos = slice(pos, pos + d), pos + d
        for name, fields in spec.bag_tables.items():
            for f in fields:
                self.field_slices[f], pos = slice(pos, pos + tables[name].dim), pos + tables[name].dim
        self.output_dim = pos + self.n_dense

    def sparse_parameters(self) -> list[nn.Parameter]:
        """The table weights: they get sparse gradients (SparseAdam); nothing else does."""
        return list(self.weights)

    def forward(self, batch: Batch) -> torch.Tensor:
        """One `embedding_bag` per weight: id columns are bags of one (weight 1), multi-hot bags
        keep their pooling weights. One call per weight means one sparse gradient per weight,
        instead of an id gradient and a bag gradient that autograd must add every step."""
        b = batch.ids.shape[0]
        id_parts: list[torch.Tensor] = []
        bag_parts: dict[str, torch.Tensor] = {}
        groups = {gi: (getattr(self, c), getattr(self, s)) for gi, c, s in self._id_groups}
        for gi, d in enumerate(self.dims):
            values, offsets, weights, sizes = [], [], [], []
            n = 0
            if gi in groups:
                cols, base = groups[gi]
                ids = (batch.ids.index_select(1, cols) + base).reshape(-1)    # [B * S_g]
                values.append(ids)
                offsets.append(torch.arange(ids.numel(), dtype=torch.long, device=ids.device))
                weights.append(torch.ones(ids.numel(), device=ids.device))
                sizes.append(ids.numel())
                n = ids.numel()
            bag_names = [name for name in self.bag_tables if self.table_dim[name] == d]
            for name in bag_names:
                x = batch.bags[name]
                values.append(x.values + self.table_base[name])
                offsets.append(x.offsets + n)
                weights.append(x.weights if x.weights is not None else torch.ones(x.values.numel(), device=x.values.device))
                sizes.append(x.offsets.numel())
                n += x.values.numel()
            pooled = F.embedding_bag(torch.cat(values), self.weights[gi], torch.cat(offsets), mode="sum",
                                     per_sample_weights=torch.cat(weights), sparse=True)
            chunks = pooled.split(sizes)
            if gi in groups:
                id_parts.append(chunks[0].reshape(b, -1))
                chunks = chunks[1:]
            for name, c in zip(bag_names, chunks):
                bag_parts[name] = c.reshape(b, -1)
        parts = id_parts + [bag_parts[name] for name in self.bag_tables]
        if self.n_dense:
            parts.append(batch.dense)
        return torch.cat(parts, dim=1)
