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

from features.spec import FeatureSpec
from pipeline.batch import Batch


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
            nn.Parameter(torch.randn(rows[d], d) * init_std) for d in dims)
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
        b = batch.ids.shape[0]
        parts: list[torch.Tensor] = []
        for gi, cols_name, base_name in self._id_groups:
            cols, base = getattr(self, cols_name), getattr(self, base_name)
            ids = batch.ids.index_select(1, cols) + base                      # [B, S_g]
            parts.append(F.embedding(ids, self.weights[gi], sparse=True).reshape(b, -1))
        for name, k in self.bag_tables.items():
            x = batch.bags[name]
            d = self.table_dim[name]
            w = self.weights[self.dims.index(d)]
            pooled = F.embedding_bag(x.values + self.table_base[name], w, x.offsets, mode="sum",
                                     per_sample_weights=x.weights, sparse=True)  # [B*k, D]
            parts.append(pooled.reshape(b, k * d))
        if self.n_dense:
            parts.append(batch.dense)
        return torch.cat(parts, dim=1)
