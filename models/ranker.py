"""MultiTaskRanker: embeddings -> bottom -> one tower per task -> logits and probabilities.

Tasks, their types and ESMM parents all come from `spec.tasks`; the model names no task itself.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mtrank.features.outputs import OutputSchema
from mtrank.features.spec import FeatureSpec, SpecError
from mtrank.models.bottoms import MMoE, OMoE, PLE, BatchedMLP, SharedBottom
from mtrank.models.config import EsmmConfig, ModelConfig
from mtrank.models.embedding import FusedEmbeddings
from mtrank.models.batch import Batch, ModelOutput


def build_bottom(cfg: ModelConfig, tasks: tuple[str, ...], in_dim: int) -> nn.Module:
    if cfg.bottom == "shared_bottom":
        return SharedBottom(tasks, in_dim, cfg.expert_mlp, cfg.dropout)
    if cfg.bottom == "omoe":
        return OMoE(tasks, in_dim, cfg.experts, cfg.expert_mlp, cfg.dropout)
    if cfg.bottom == "mmoe":
        return MMoE(tasks, in_dim, cfg.experts, cfg.expert_mlp, cfg.dropout)
    return PLE(tasks, in_dim, cfg.experts, cfg.ple_task_experts, cfg.ple_levels, cfg.expert_mlp, cfg.dropout)


def check_tables(spec: FeatureSpec, cfg: ModelConfig) -> None:
    """The model config's table names against the spec: a job calls it before reading any data."""
    esmm = cfg.esmm
    if isinstance(esmm, EsmmConfig) and esmm.detach_tables is not None:
        unknown = sorted(set(esmm.detach_tables) - set(spec.embedding_tables))
        if unknown:
            raise SpecError(f"model.esmm.detach_tables: {', '.join(map(repr, unknown))} is not an embedding table "
                            f"of the spec (its tables: {', '.join(spec.embedding_tables)})")


class DenseStage(nn.Module):
    """A ranker's bottom + towers as one module, sharing its parameters: the part a data-parallel
    trainer hands to DDP (the tables' sparse gradients are synchronised on their own)."""

    def __init__(self, ranker: "MultiTaskRanker"):
        super().__init__()
        self.bottom, self.towers = ranker.bottom, ranker.towers
        self._dense = ranker.dense

    def forward(self, x: torch.Tensor, tower_rows: torch.Tensor | None = None) -> tuple[torch.Tensor, dict | None]:
        return self._dense(x, tower_rows)


class MultiTaskRanker(nn.Module):
    """forward(batch) -> ModelOutput, its predictions named by the spec's `OutputSchema`.

    Binary tasks: probability = sigmoid(logit). Children with a `parent`: also the product
    p_parent * p_task and its log (a logsigmoid sum, finite for any logit, so the entire-space BCE
    can be computed in log space). Regression tasks: the logit is the raw prediction; with loss
    mse_log1p it is log1p(value) and the prediction is expm1(clamp(raw, min=0)).
    """

    def __init__(self, spec: FeatureSpec, cfg: ModelConfig | None = None, initialise: bool = True):
        """`initialise=False`: embedding tables uninitialised, for loading a state dict next."""
        super().__init__()
        self.cfg = cfg = cfg or ModelConfig()
        self.task_specs = spec.tasks
        self.schema: OutputSchema = spec.outputs
        self.tasks = tuple(t.name for t in spec.tasks)
        self.embeddings = FusedEmbeddings(spec, initialise=initialise)
        self.bottom = build_bottom(cfg, self.tasks, self.embeddings.output_dim)
        # All towers in one batched MLP: tower t reads bottom features t.
        self.towers = BatchedMLP(len(self.tasks), self.bottom.out_dim, cfg.tower_mlp + (1,),
                                 cfg.dropout, last_activation=False)
        # Post-hoc calibration of each binary task: p = sigmoid(scale * logit + shift), fitted after
        # training on held-out rows (identity while training). A buffer, so it travels with the
        # weights into every place the model predicts (evaluation, scoring, the registered pyfunc).
        self.register_buffer("calibration", torch.tensor([[1.0, 0.0]] * len(self.tasks)))
        # esmm.tower_scope tower | dense -- the children's own-logit term reads their towers over detached
        # bottom features (tower) or over the bottom run again on detached embeddings (dense): rows
        # appended to the raw outputs while training; `outputs` splits them off
        esmm = cfg.esmm
        self._scope = esmm.tower_scope if isinstance(esmm, EsmmConfig) and esmm.tower_loss != "none" else "all"
        self._detached_towers = tuple(i for i, t in enumerate(spec.tasks) if t.parent is not None) \
            if self._scope != "all" else ()
        # esmm.detach_tables -- the embedding columns the dense scope's second bottom pass reads detached
        # (None: every column)
        self.register_buffer("_detach_cols", self._detached_columns(spec, esmm) if self._scope == "dense" else None,
                             persistent=False)
        # esmm.id_bias -- per child, one private scalar per id row (see EsmmConfig.id_bias)
        self._id_bias_scale = esmm.id_bias if self._scope == "dense" else 0.0
        self.id_biases = FusedEmbeddings(spec, init_std=0.0, initialise=initialise, width=len(self._detached_towers),
                                         with_dense=False) \
            if self._id_bias_scale > 0 and self._detached_towers else None

    def _detached_columns(self, spec: FeatureSpec, esmm: EsmmConfig) -> torch.Tensor | None:
        """bool [input columns]: True where the column is an embedding of a table in `detach_tables`."""
        if esmm.detach_tables is None:
            return None
        check_tables(spec, self.cfg)
        table_of = {f: t.name for t in spec.embedding_tables.values() for f in t.fields}
        cols = torch.zeros(self.embeddings.output_dim, dtype=torch.bool)
        for field, where in self.embeddings.field_slices.items():
            cols[where] = table_of[field] in esmm.detach_tables
        return cols

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Weights saved before calibration existed load as uncalibrated (identity)."""
        state_dict.setdefault(prefix + "calibration", torch.tensor([[1.0, 0.0]] * len(self.tasks)))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def set_calibration(self, params: dict[str, tuple[float, float]]) -> None:
        """(scale, shift) per binary task; tasks not named return to identity."""
        self.calibration.copy_(torch.tensor([list(params.get(t, (1.0, 0.0))) for t in self.tasks]))

    def calibration_params(self) -> dict[str, tuple[float, float]]:
        """The non-identity calibrations, by task."""
        return {t: (float(a), float(b)) for t, (a, b) in zip(self.tasks, self.calibration.tolist())
                if (a, b) != (1.0, 0.0)}

    @torch.no_grad()
    def init_heads(self, targets: dict[str, float]) -> None:
        """Start each tower's output at its task's base level: logit(rate) for binary tasks, the mean
        (in loss space) for regression. Without it a regression head starts ~3 units off target
        (log1p of ~30 s dwell) and its gradients swamp the shared experts for the first steps."""
        bias = self.towers.biases[-1]                   # [T, 1, 1]
        for i, t in enumerate(self.task_specs):
            if t.name not in targets:
                continue
            v = targets[t.name]
            if t.type == "binary":
                v = min(max(v, 1e-4), 1 - 1e-4)
                v = math.log(v / (1 - v))
            bias[i].fill_(v)

    def sparse_parameters(self) -> list[nn.Parameter]:
        """Embedding tables and the per-id biases (sparse grads -> SparseAdam / row-wise Adagrad)."""
        return self.embeddings.sparse_parameters() + (self.id_biases.sparse_parameters() if self.id_biases else [])

    def row_l2(self) -> dict[nn.Parameter, tuple[torch.Tensor, torch.Tensor]]:
        """Per-row L2 of every sparse weight (FusedEmbeddings.row_l2): a table's L2 covers its biases too."""
        return {**self.embeddings.row_l2(), **(self.id_biases.row_l2() if self.id_biases else {})}

    def set_admission(self, admitted: dict[str, object]) -> None:
        """Frequency admission (FusedEmbeddings.set_admission) of the tables and of their per-id biases."""
        for e in self.lookups():
            e.set_admission(admitted)

    def lookups(self) -> list[FusedEmbeddings]:
        """Every module whose rows are ids of the spec's tables: the embeddings, then the per-id biases."""
        return [self.embeddings] + ([self.id_biases] if self.id_biases is not None else [])

    def id_bias(self, batch: Batch) -> torch.Tensor | None:
        """[B, children] the children's per-id biases summed over the row's ids, scaled; None when off."""
        if self.id_biases is None:
            return None
        b = self.id_biases(batch)
        return b.reshape(b.shape[0], -1, len(self._detached_towers)).sum(1) * self._id_bias_scale

    def dense_parameters(self) -> list[nn.Parameter]:
        """Everything else (dense grads -> Adam/AdamW)."""
        sparse = {id(p) for p in self.sparse_parameters()}
        return [p for p in self.parameters() if id(p) not in sparse]

    def forward(self, batch: Batch) -> ModelOutput:
        return self.outputs(*self.dense(self.embeddings(batch), self.tower_rows(batch)), id_bias=self.id_bias(batch))

    def tower_rows(self, batch: Batch) -> torch.Tensor | None:
        """Rows the children's own-logit term reads (the union of their spaces) with
        `esmm.tower_scope: dense`, which runs the bottom a second time on those rows alone; else None."""
        if self._scope != "dense" or not self.training:
            return None
        masks = [batch.masks[self.tasks[i]] for i in self._detached_towers if self.tasks[i] in batch.masks]
        if len(masks) < len(self._detached_towers):
            return None    # a child without its mask: every row (the term then picks its own)
        return torch.stack(masks).any(0)

    def predict(self, batch: Batch) -> dict[str, torch.Tensor]:
        """The named predictions alone (scoring, serving): no log-products, which only a loss reads."""
        raw, gates = self.dense(self.embeddings(batch))
        return self.outputs(raw, gates, with_log_products=False, id_bias=self.id_bias(batch)).predictions

    def dense(self, x: torch.Tensor, tower_rows: torch.Tensor | None = None) -> tuple[torch.Tensor, dict | None]:
        """[B, in] -> raw tower outputs [T, B] and gates: everything whose gradients are dense.

        Under mixed precision only the bottom (where ~99 % of the FLOPs are) runs in bf16: a bf16
        head rounds logits to 3 significant digits, which ties rare-task scores and perturbs their
        gradients, for ~1 % of the work. Training with `esmm.tower_scope` tower | dense appends
        [children, B] rows: the towers' logits as the children's own-logit term reads them."""
        h, gates = self.bottom(x)                       # [T, B, H]
        extra = self._detached_towers and self.training
        if extra and self._scope == "dense":   # the bottom again, on detached embeddings: the term
            rows = tower_rows if tower_rows is not None else torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
            x_rows = x[rows]
            x_rows = x_rows.detach() if self._detach_cols is None else \
                torch.where(self._detach_cols, x_rows.detach(), x_rows)       # the tables it must not train
            h_rows = self.bottom(x_rows)[0] if bool(rows.any()) else None
        with torch.autocast(x.device.type, enabled=False):   # towers in fp32 under bf16 autocast
            h = h.float()
            raw = self.towers(h).squeeze(-1)            # [T, B]
            if extra:
                children = list(self._detached_towers)
                if self._scope == "tower":              # towers over detached features
                    own = self.towers(h.detach()).squeeze(-1)[children]
                else:                                   # zeros outside the rows: no term reads them
                    own = raw.new_zeros(len(children), raw.shape[1])
                    if h_rows is not None:
                        own[:, rows] = self.towers(h_rows.float()).squeeze(-1)[children]
                raw = torch.cat([raw, own])
            return raw, gates

    def outputs(self, raw: torch.Tensor, gates: dict | None, with_log_products: bool = True,
                id_bias: torch.Tensor | None = None) -> ModelOutput:
        """Raw tower outputs (and the children's per-id biases, `id_bias`) -> logits, probabilities,
        products, regression values (no parameters)."""
        n = len(self.tasks)
        if id_bias is not None:   # the own-logit rows read them, the logits everything else reads detached
            rows = torch.tensor(self._detached_towers, device=raw.device)
            bias = id_bias.T.to(raw.dtype)                                       # [children, B]
            if raw.shape[0] > n:
                raw = torch.cat([raw[:n].index_add(0, rows, bias.detach()), raw[n:] + bias])
            else:
                raw = raw.index_add(0, rows, bias)
        tower_logits = None
        if raw.shape[0] > n:   # training with esmm.tower_scope: tower | dense (see `dense`)
            tower_logits = {self.tasks[i]: raw[n + j] for j, i in enumerate(self._detached_towers)}
            raw = raw[:n]
        logits = {t: raw[i] for i, t in enumerate(self.tasks)}
        preds: dict[str, torch.Tensor] = {}
        log_products: dict[str, torch.Tensor] = {}
        own = {}
        for i, t in enumerate(self.task_specs):
            z = logits[t.name]
            if t.type == "binary":
                own[t.name] = torch.sigmoid(z * self.calibration[i, 0] + self.calibration[i, 1])
            elif t.loss == "mse_log1p":
                own[t.name] = torch.expm1(z.clamp(min=0))
            else:
                own[t.name] = z
        for t in self.task_specs:  # products always exist: scoring and evaluation read them
            preds[self.schema.own(t.name).name] = own[t.name]
            prod = self.schema.product(t.name)
            if prod is not None:
                preds[prod.name] = own[t.parent] * own[t.name]
                if with_log_products:
                    log_products[t.name] = F.logsigmoid(logits[t.parent]) + F.logsigmoid(logits[t.name])
        return ModelOutput(logits, preds, log_products, gates, tower_logits)
