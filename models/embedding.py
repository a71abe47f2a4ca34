"""Fused embedding lookups: one weight per embedding dim, one lookup call per group, not per field.

All tables of one dim are stacked into a single weight with per-table row offsets, so every id
column of that dim is looked up in one `F.embedding` and every bag table in one `F.embedding_bag`.
A table used by both an id column and a bag (e.g. `category`) is one row range of one weight, so
both read and update the same rows. Lookups are `sparse=True`: the tables are huge and a step
touches few rows, so a trainer should give `sparse_parameters()` to SparseAdam.

Id options (per table, from the FeatureSpec): with `min_count` > 1 a table has an extra 'rare' row
and a persistent bool buffer per weight says which rows are admitted (`set_admission`, fitted on the
training window and saved in the state dict); a lookup of a row not admitted reads the rare row.
`dropout` replaces ids (not nulls) by the rare row (the null row without admission) with
probability p while training, drawn from the torch RNG. `row_l2()` gives the sparse optimizer each
weight's per-row L2 coefficients (table row ranges).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mtrank.features.spec import EmbeddingTable, FeatureSpec
from mtrank.models.batch import Batch


class FusedEmbeddings(nn.Module):
    """Batch -> [B, output_dim]: all id-field embeddings, pooled bags (flattened), then dense."""

    def __init__(self, spec: FeatureSpec, init_std: float = 0.01, initialise: bool = True,
                 width: int | None = None, with_dense: bool = True):
        """`initialise=False` leaves the tables' memory as allocated: for a model whose weights are
        loaded next (drawing ~10^8 normals costs seconds at every scoring start). `width`: every table
        `width` wide instead of its own dim, same rows, admission and L2, no dropout (a ranker's per-id biases);
        `with_dense=False`: the output holds the lookups alone."""
        super().__init__()
        tables = spec.embedding_tables
        if width is not None:
            tables = {name: EmbeddingTable(name, t.buckets, width, t.fields, t.min_count, t.l2)   # no dropout
                      for name, t in tables.items()}
        dims = sorted({t.dim for t in tables.values()})
        self.dims = tuple(dims)
        base: dict[str, int] = {}
        rows = {d: 0 for d in dims}
        for t in tables.values():
            base[t.name] = rows[t.dim]
            rows[t.dim] += t.rows
        self.table_dim = {name: t.dim for name, t in tables.items()}
        self.table_base = dict(base)
        self.table_buckets = {name: t.buckets for name, t in tables.items()}
        self.table_l2 = {name: t.l2 for name, t in tables.items()}
        # Where a not-admitted (rare) or dropped id goes, as a row of the stacked weight.
        self.rare_row = {name: base[name] + t.rare_id for name, t in tables.items() if t.rare_id is not None}
        self.drop_row = {name: self.rare_row.get(name, base[name]) for name in tables}
        self.table_dropout = {name: t.dropout for name, t in tables.items() if t.dropout > 0}
        self._any_dropout = bool(self.table_dropout)
        self._admit: dict[int, str] = {}   # dim index -> bool buffer over the weight's rows (True = own row)
        for gi, d in enumerate(dims):
            if any(tables[n].dim == d for n in self.rare_row):
                self.register_buffer(f"admit{gi}", torch.ones(rows[d], dtype=torch.bool))
                self._admit[gi] = f"admit{gi}"
        self.weights = nn.ParameterList(
            nn.Parameter(torch.empty(rows[d], d).normal_(0.0, init_std) if initialise and init_std > 0
                         else torch.zeros(rows[d], d) if initialise else torch.empty(rows[d], d))
            for d in dims)  # in place: no 2nd copy
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
            tabs = [spec.id_fields[c][1] for c in cols]
            self.register_buffer(f"_rare{gi}", torch.tensor([self.rare_row.get(t, 0) for t in tabs], dtype=torch.long),
                                 persistent=False)
            self.register_buffer(f"_drop{gi}", torch.tensor([self.drop_row[t] for t in tabs], dtype=torch.long),
                                 persistent=False)
            self.register_buffer(f"_dropp{gi}", torch.tensor([self.table_dropout.get(t, 0.0) for t in tabs]),
                                 persistent=False)
        self.bag_tables = {name: len(fields) for name, fields in spec.bag_tables.items()}
        # piecewise-linear features are several columns
        self.n_dense = sum(f.dense_width for f in spec.dense) if with_dense else 0
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

    def row_l2(self) -> dict[nn.Parameter, tuple[torch.Tensor, torch.Tensor]]:
        """weight -> (first row of each table, its L2 coefficient), sorted by row, for the weights
        where some table has l2 > 0: a row's coefficient is `coef[searchsorted(starts, row, right) - 1]`."""
        out = {}
        for gi, d in enumerate(self.dims):
            tabs = sorted((self.table_base[n], self.table_l2[n]) for n in self.table_base if self.table_dim[n] == d)
            if any(c > 0 for _, c in tabs):
                out[self.weights[gi]] = (torch.tensor([b for b, _ in tabs], dtype=torch.long),
                                         torch.tensor([c for _, c in tabs], dtype=torch.float32))
        return out

    @torch.no_grad()
    def set_admission(self, admitted: dict[str, object]) -> None:
        """table -> bool [buckets] (True = the id keeps its own row); tables with a rare row only."""
        for name, ok in admitted.items():
            if name not in self.rare_row:
                raise ValueError(f"table {name!r} has no frequency admission (min_count 1)")
            ok = torch.as_tensor(ok, dtype=torch.bool)   # a numpy bool array or a tensor
            if ok.shape != (self.table_buckets[name],):
                raise ValueError(f"table {name!r}: admission of shape {tuple(ok.shape)}, expected "
                                 f"({self.table_buckets[name]},)")
            buf = getattr(self, self._admit[self.dims.index(self.table_dim[name])])
            base = self.table_base[name]
            buf[base:base + ok.numel()] = ok.to(buf.device)
            buf[self.rare_row[name]] = True

    def admitted(self, name: str) -> torch.Tensor | None:
        """bool [buckets] of the table's admitted ids, None without admission."""
        if name not in self.rare_row:
            return None
        buf = getattr(self, self._admit[self.dims.index(self.table_dim[name])])
        return buf[self.table_base[name]:self.table_base[name] + self.table_buckets[name]]

    def _remap(self, gi: int, rows: torch.Tensor, raw: torch.Tensor, rare: torch.Tensor, drop: torch.Tensor,
               p: torch.Tensor | float) -> torch.Tensor:
        """Rows after admission (not admitted -> rare) and, training only, dropout (non-null -> drop row)."""
        if gi in self._admit:
            rows = torch.where(getattr(self, self._admit[gi])[rows], rows, rare)
        if self.training and self._any_dropout:
            hit = (torch.rand(rows.shape, device=rows.device) < p) & (raw != 0)
            rows = torch.where(hit, drop, rows)
        return rows

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
                raw = batch.ids.index_select(1, cols)
                ids = self._remap(gi, raw + base, raw, getattr(self, f"_rare{gi}"), getattr(self, f"_drop{gi}"),
                                  getattr(self, f"_dropp{gi}")).reshape(-1)    # [B * S_g]
                values.append(ids)
                offsets.append(torch.arange(ids.numel(), dtype=torch.long, device=ids.device))
                weights.append(torch.ones(ids.numel(), device=ids.device))
                sizes.append(ids.numel())
                n = ids.numel()
            bag_names = [name for name in self.bag_tables if self.table_dim[name] == d]
            for name in bag_names:
                x = batch.bags[name]
                values.append(self._remap(gi, x.values + self.table_base[name], x.values,
                                          torch.tensor(self.rare_row.get(name, 0), device=x.values.device),
                                          torch.tensor(self.drop_row[name], device=x.values.device),
                                          self.table_dropout.get(name, 0.0)))
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
