"""The multi-task training loop over the streaming reader.

Everything task-specific lives in the loss terms built from the task records; the loop itself
only runs forward, loss, backward, clip and the two optimizers (row-wise Adagrad or SparseAdam for
the tables, Adam for the rest). It is deterministic on CPU for a given seed, and a checkpoint
carries what is needed to continue exactly: weights, both optimizer states, the RNG, and the
position in the epoch's (seeded) batch order.
"""
from __future__ import annotations

from mtrank.features.base import MtrankError, StrictConfig, failpoint

import functools
import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from mtrank.features.numeric import NumericStats
from mtrank.features.spec import FeatureSpec
from mtrank.models import DenseStage, ModelConfig, ModelOutput, MultiTaskRanker
from mtrank.pipeline.checkpoint import CheckpointStore
from mtrank.pipeline.evaluate import precision_autocast
from mtrank.pipeline.distributed import SINGLE, Dist, GradientSync, lockstep, resolve_device
from mtrank.pipeline.losses import MultiTaskLoss
from mtrank.pipeline.optim import dense_optimizer, sparse_optimizer
from mtrank.pipeline.progress import Progress
from mtrank.pipeline.reader import ImpressionReader, RowAccounting

log = logging.getLogger("mtrank.train")


class NegativeSampling(StrictConfig):
    """Which rows are negatives and how many of them training keeps."""

    task: str = Field(description="a binary task trained on all rows (space: all, e.g. the click task): a row whose label of it "
                                  "is 0 is a negative")
    keep_rate: float = Field(gt=0, le=1, description="share of the negatives kept, chosen by a hash of the row's "
                             "file, row group and position: the same rows on every rerun, rank and epoch")


class EarlyStopping(StrictConfig):
    """Stop when the validation objective has not improved for `patience` epochs; keep the best epoch.

    Epoch granularity: the validation points of `validate_every_steps` are curves only (history,
    report, MLflow); they neither choose the best weights nor count towards the patience."""
    # Why: a best point inside an epoch would need its weights kept at that step, and a resume that
    # restores them (and the objective's best so far) exactly; the epoch ends' are in the checkpoints.

    patience: int = Field(default=2, ge=1, description="epochs without a better validation objective before "
                          "training stops")
    objective: Literal["loss", "auc"] = Field(
        default="loss", description="loss: the task-weighted sum of validation losses (lower is better); auc: the "
        "task-weighted mean AUC of the binary tasks (higher is better; where ranking is what counts and the loss "
        "still wavers, calibration fixes the level afterwards); auc without a binary task falls back to loss")


class TrainSettingError(MtrankError, ValueError):
    """A `train` setting this run cannot honour: on this machine (bf16 without the instructions) or
    with this many ranks (a global batch that does not divide). One line, exit 2, like bad input."""


class TrainConfig(StrictConfig):
    """Optimisation knobs; strict so that a misspelt key in a job config is an error."""

    epochs: int = Field(default=1, gt=0, description="passes over the training window")
    batch_size: int = Field(default=4096, gt=0, description="rows per step, over all ranks together (each of N "
                            "ranks takes batch_size / N)")
    lr: float = Field(default=1e-3, gt=0, description="Adam, dense parameters")
    weight_decay: float = Field(default=0.0, ge=0, description="Adam weight decay of the dense parameters")
    sparse_optimizer: Literal["rowwise_adagrad", "adam"] = Field(
        default="rowwise_adagrad", description="optimizer of the embedding tables: row-wise Adagrad (one "
        "accumulator per row) or sparse Adam")
    sparse_lr: float = Field(default=0.05, gt=0, description="embedding tables")
    sparse_initial_accumulator: float = Field(default=0.0, ge=0, description="row-wise Adagrad's starting sum")
    loss_weighting: Literal["fixed", "uncertainty"] = Field(
        default="fixed", description="fixed: the task records' `weight`; uncertainty: a learned log σ² per task "
        "(Kendall et al. 2018)")
    grad_clip: float | None = Field(default=10.0, gt=0, description="max L2 norm of dense gradients")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        default="auto", description="bf16 autocasts the bottom (towers, losses and evaluation stay fp32) on CPUs "
        "with avx512_bf16 / AMX; auto = bf16 where the training device is such a CPU, else fp32 (GPUs included)")
    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto", description="auto: each rank's GPU when CUDA is present, else the CPU")
    shuffle: bool = Field(default=True, description="permute row groups per epoch and rows within the shuffle "
                          "buffer")
    shuffle_buffer: int = Field(default=65_536, gt=0, description="rows in the shuffle buffer (bounds memory)")
    feature_cache: Literal["auto", "memory", "disk", "off"] = Field(
        default="auto", description="featurize once: memory keeps the window's hashed rows (when they fit "
        "feature_cache_mb) and shuffles all of them every epoch; disk writes them under work_dir/feature-cache "
        "during the first epoch for the next ones (and reruns on the same files); auto = memory, else disk; "
        "off = every epoch reads and hashes again")
    data_workers: int = Field(default=1, ge=1, description="threads reading, validating and hashing row groups "
                              "ahead of training (same rows in the same order for any number; see bench/README.md "
                              "for the scaling)")
    feature_cache_mb: int = Field(default=2048, gt=0, description="memory for the featurized window per rank; "
                                  "a larger window goes to the disk cache")
    seed: int = Field(default=0, description="seeds initialisation and shuffling: the same seed gives "
                      "bit-identical weights on CPU")
    checkpoint_every: int = Field(default=0, ge=0, description="steps between checkpoints; 0 = epoch ends only")
    checkpoint_keep: int = Field(default=2, gt=0, description="checkpoints kept on disk (older ones are deleted)")
    min_rows: int = Field(default=100, gt=0, description="a training window with fewer rows is an error, "
                          "not a model")
    log_every_steps: int = Field(default=50, gt=0, description="steps between two points of the training curves "
                                 "(running-mean loss per task and samples/s, logged and sent to MLflow)")
    validation_days: int = Field(default=0, ge=0, description="the newest N days of the training window are held "
                                 "out and evaluated after every epoch (per-task loss and AUC); 0 = none")
    validation_fraction: float = Field(default=0.0, ge=0.0, lt=0.5, description="instead of whole days: this "
                                       "share of the window's requests (a stable hash of the spec's request_id; of "
                                       "each row's file and position when the spec has no request_id) is held out "
                                       "for validation; for windows of few days")
    validate_every_steps: int = Field(default=0, ge=0, description="also run the epoch-end validation (per-task "
                                      "loss and AUC on the held-out rows) every N global steps inside an epoch: "
                                      "history validation_steps, the report's loss curves and MLflow val_loss.* / "
                                      "val_auc.* at their step; training is unchanged by it (early stopping "
                                      "still decides per epoch). Needs validation_days or validation_fraction; "
                                      "0 = epoch ends only")
    calibration: Literal["none", "platt"] = Field(
        default="none", description="platt: after training, fit p = sigmoid(a·logit + b) per binary task on the "
        "validation days (needs validation_days > 0); saved in the weights, applied wherever the model predicts")
    calibration_prior_sd: float | None = Field(
        default=0.1, gt=0, description="standard deviation of the Platt fit's Gaussian prior on (a - 1) and b "
        "(centred on the identity, or on negative sampling's log keep_rate): a validation split with few "
        "positives moves the model little, one with thousands fits freely; null = plain maximum likelihood")

    negative_sampling: "NegativeSampling | None" = Field(
        default=None, description="train on a deterministic share of one task's negatives (e.g. unclicked "
        "impressions); the model's output for that task is recalibrated automatically (shift log keep_rate, or "
        "the Platt fit on unsampled validation rows)")

    early_stopping: EarlyStopping | None = Field(
        default=None, description="stop when the validation objective stops improving and make the best epoch's "
        "weights the model (needs validation_days > 0); null = train every epoch")

    @model_validator(mode="after")
    def _calibration_needs_validation(self) -> "TrainConfig":
        if self.validation_days and self.validation_fraction:
            raise ValueError("validation_days and validation_fraction are two ways to hold out validation rows: "
                             "set one")
        held = self.validation_days > 0 or self.validation_fraction > 0
        if self.calibration != "none" and not held:
            raise ValueError("calibration: platt is fitted on held-out rows: set validation_days >= 1 (or "
                             "validation_fraction)")
        if self.early_stopping is not None and not held:
            raise ValueError("early_stopping watches the validation rows: set validation_days >= 1 (or "
                             "validation_fraction)")
        if self.validate_every_steps and not held:
            raise ValueError("validate_every_steps evaluates the validation rows: set validation_days >= 1 (or "
                             "validation_fraction)")
        return self

    def check_ranks(self, world_size: int) -> None:
        """The global batch splits evenly over the ranks. Checked by the launcher before any rank
        starts (one line, not one traceback per rank) and again by each rank's Trainer."""
        if self.batch_size % world_size:
            raise TrainSettingError(f"train.batch_size {self.batch_size} is the global batch and must divide evenly "
                                    f"over {world_size} ranks")

    def fingerprint_fields(self) -> dict:
        """What must not change between a checkpoint and its resume (epochs may grow). Knobs that
        leave the weights bit-identical stay out: checkpoint and curve cadence, devices, validation
        inside an epoch (it runs in eval mode with the training RNG put back). Precision enters as
        resolved by the Trainer (auto is bf16 on one CPU, fp32 on another)."""
        return self.model_dump(exclude={"epochs", "checkpoint_every", "checkpoint_keep", "device", "min_rows", "precision",
                                        "log_every_steps", "data_workers", "validate_every_steps"})


class NonFiniteLossError(MtrankError, RuntimeError):
    pass


class DivergedError(MtrankError, RuntimeError):
    """Training ended with a model that cannot rank: non-finite or constant predictions."""


class ResumeMismatchError(MtrankError, RuntimeError):
    """A checkpoint this run may not continue from: `problem` says why, `remedy` what to do, which
    depends on the command (`mtrank train --resume` vs a daily that resumes by itself)."""

    def __init__(self, problem: str, remedy: str):
        super().__init__(f"{problem}; {remedy}")
        self.problem, self.remedy = problem, remedy

    def __reduce__(self):   # picklable (a worker's error re-raised elsewhere) despite two arguments
        return type(self), (self.problem, self.remedy)


def _leaves(tree, prefix: str = "") -> dict[str, object]:
    """A nested mapping as dotted paths -> values; a list of named records (a spec's features, tasks)
    is keyed by name, so a change reads `spec.features.user_id.buckets`, other lists are leaves."""
    if isinstance(tree, list) and tree and all(isinstance(x, dict) and "name" in x for x in tree):
        tree = {x["name"]: x for x in tree}
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, object] = {}
    for k, v in tree.items():
        out.update(_leaves(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def _short(v, width: int = 48) -> str:
    text = json.dumps(v, default=str)
    return text if len(text) <= width else text[: width - 3] + "..."


def setup_differences(then: dict, now: dict, most: int = 3) -> str:
    """What differs between two run setups (`Trainer.setup`), as `key: then -> now` for the first
    `most` keys, so a refused resume says which setting changed instead of only that one did."""
    a, b = _leaves(then), _leaves(now)
    keys = sorted(k for k in a.keys() | b.keys() if a.get(k, "<unset>") != b.get(k, "<unset>"))
    named = [f"{k}: {_short(a.get(k, '<unset>'))} -> {_short(b.get(k, '<unset>'))}" for k in keys[:most]]
    return "; ".join(named) + (f" (and {len(keys) - most} more)" if len(keys) > most else "")


def build_model(spec: FeatureSpec, cfg: ModelConfig, seed: int, stats: NumericStats | None = None) -> MultiTaskRanker:
    """Seeded construction: the same seed gives the same initial weights in any process. With
    fitted statistics the heads start at each task's base rate / target mean."""
    torch.manual_seed(seed)
    model = MultiTaskRanker(spec, cfg)
    if stats is not None:
        model.init_heads({t.name: m.mean for t in spec.tasks if (m := stats.target(t.name)) is not None})
    return model


def resolve_precision(precision: str, device: torch.device) -> Literal["fp32", "bf16"]:
    """`train.precision` as a training on `device` runs it. auto picks bf16 only where it was shown to
    keep AUC and to pay (bench/README.md: a CPU with bf16 instructions); CUDA stays fp32 until its
    bf16 path is measured."""
    if precision == "auto":
        return "bf16" if device.type == "cpu" and bf16_supported() else "fp32"
    if precision == "bf16" and device.type == "cpu" and not bf16_supported():
        raise TrainSettingError("train.precision: bf16 needs a CPU with avx512_bf16 or AMX; use fp32 (or auto)")
    return precision


@functools.cache
def bf16_supported() -> bool:
    """Read once a process: every Trainer asks (precision auto), the CPU does not change."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


@dataclass
class EpochStats:
    epoch: int
    rows: int = 0
    steps: int = 0
    seconds: float = 0.0
    loss_sums: dict[str, float] = field(default_factory=dict)   # sum of batch loss * population
    populations: dict[str, int] = field(default_factory=dict)

    def add(self, losses: dict[str, float], counts: dict[str, int], rows: int) -> None:
        self.rows += rows
        self.steps += 1
        for t, v in losses.items():
            self.loss_sums[t] = self.loss_sums.get(t, 0.0) + v * counts[t]
            self.populations[t] = self.populations.get(t, 0) + counts[t]

    def merge(self, other: "EpochStats") -> "EpochStats":
        """Two ranks' shares of one epoch (steps are taken together: the count is one rank's)."""
        keys = list(dict.fromkeys([*self.loss_sums, *other.loss_sums]))
        return EpochStats(self.epoch, self.rows + other.rows, max(self.steps, other.steps),
                          max(self.seconds, other.seconds),
                          {t: self.loss_sums.get(t, 0.0) + other.loss_sums.get(t, 0.0) for t in keys},
                          {t: self.populations.get(t, 0) + other.populations.get(t, 0) for t in keys})

    def losses(self) -> dict[str, float]:
        return {t: self.loss_sums[t] / n for t, n in self.populations.items() if n}

    def as_dict(self) -> dict:
        return {"epoch": self.epoch, "rows": self.rows, "steps": self.steps, "seconds": self.seconds,
                "samples_per_s": self.rows / self.seconds if self.seconds else 0.0,
                "loss": self.losses(), "population": dict(self.populations),
                "loss_sums": dict(self.loss_sums)}

    @staticmethod
    def from_dict(d: dict) -> "EpochStats":
        return EpochStats(d["epoch"], d["rows"], d["steps"], d["seconds"], dict(d["loss_sums"]),
                          dict(d["population"]))


@dataclass
class TrainResult:
    epochs: list[dict]
    global_step: int
    rows_trained: int
    accounting: RowAccounting
    resumed_from_step: int | None = None
    best_epoch: int | None = None       # early stopping: the epoch whose weights the model has
    stopped_early: bool = False
    # train.validate_every_steps (rank 0): {step, epoch, samples, validation} at steps that are not an
    # epoch's last (that one's figures are the epoch record's `validation`), resumed runs' included
    validation_steps: list[dict] = field(default_factory=list)


TrainConfig.model_rebuild()


class TrainingEvents:
    """Hooks the jobs layer attaches (live MLflow curves); called on rank 0 only, never fatal to training."""

    def on_steps(self, point: dict) -> None:
        """Every `log_every_steps`: {step, epoch, samples, samples_per_s, loss: {task: mean since last point}}."""

    def on_epoch(self, record: dict) -> None:
        """Every epoch end: the epoch's record (`EpochStats.as_dict`, plus `validation` when evaluated)."""

    def on_validation(self, point: dict) -> None:
        """Every `validate_every_steps` inside an epoch: {step, epoch, samples, validation: the same
        figures as an epoch record's `validation`}."""


class Trainer:
    """Owns the loss and optimizers for one model; `fit` runs (or resumes) the epochs.

    With `dist` (a rank of a torchrun job) the same loop runs data-parallel: the reader passed to
    `fit` holds this rank's shard, the dense stage is wrapped in DDP, table gradients are summed
    sparsely, steps are taken in lockstep, and only rank 0 writes checkpoints. `batch_size` stays
    the global batch (each rank takes batch_size / world_size rows a step), so a job keeps its
    learning rates and step count whatever the number of ranks.
    """

    def __init__(self, model: MultiTaskRanker, spec: FeatureSpec, cfg: TrainConfig,
                 checkpoints: CheckpointStore | None = None, fingerprint: dict | None = None,
                 dist: Dist = SINGLE):
        self.device = resolve_device(cfg.device, dist)
        self.precision = resolve_precision(cfg.precision, self.device)
        if cfg.precision == "auto" and dist.is_main:
            log.info("precision auto: %s on %s", self.precision, self.device)
        cfg.check_ranks(dist.world_size)
        self.model, self.spec, self.cfg, self.dist = model.to(self.device), spec, cfg, dist
        self.loss = MultiTaskLoss(spec, esmm=model.cfg.esmm, weighting=cfg.loss_weighting).to(self.device)
        self.sparse_opt = sparse_optimizer(model.sparse_parameters(), cfg.sparse_optimizer, cfg.sparse_lr,
                                           cfg.sparse_initial_accumulator, row_l2=model.row_l2())
        self.dense_params = model.dense_parameters() + list(self.loss.parameters())
        self.dense_opt = dense_optimizer(self.dense_params, cfg.lr, cfg.weight_decay)
        self.checkpoints = checkpoints   # every rank reads it on resume; rank 0 alone writes
        self.setup = self._setup({**(fingerprint or {}), "precision": self.precision,
                                  **({"world_size": dist.world_size} if dist.enabled else {})})
        self.fingerprint = hashlib.sha256(json.dumps(self.setup, sort_keys=True, default=str).encode()).hexdigest()
        self.global_step = 0
        self.rows_trained = 0
        self.validation_points: list[dict] = []   # train.validate_every_steps, checkpointed with the history
        self.ddp: nn.Module | None = None
        self.sync = GradientSync(dist, model.sparse_parameters(), list(self.loss.parameters()))
        if dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            for w in model.sparse_parameters():   # same seeded init everywhere; made certain
                torch.distributed.broadcast(w.data, src=0)
            on_gpu = self.device.type == "cuda"
            self.ddp = DistributedDataParallel(DenseStage(model),  # no buffers to sync
                                               device_ids=[self.device.index] if on_gpu else None)

    @property
    def rank_batch_size(self) -> int:
        return self.cfg.batch_size // self.dist.world_size

    def _setup(self, extra: dict) -> dict:
        """Everything a checkpoint must share with the run that resumes it; its hash is the fingerprint,
        and the checkpoint keeps it whole so a refusal can name what changed."""
        return json.loads(json.dumps({"spec": self.spec.fingerprint(), "model": self.model.cfg.model_dump(mode="json"),
                                      "train": self.cfg.fingerprint_fields(), **extra}, default=str))

    def _record(self) -> dict:
        """The setup as a checkpoint keeps it: the spec whole rather than hashed, so a refused resume
        names the spec field that changed (`spec.features.user_id.buckets`)."""
        return {**self.setup, "spec": self.spec.model_dump(mode="json")}

    # -- one step -------------------------------------------------------------------------
    def _autocast(self):
        return precision_autocast(self.device, self.precision)

    def _forward(self, batch) -> "ModelOutput":
        if self.ddp is None:
            return self.model(batch)
        return self.model.outputs(*self.ddp(self.model.embeddings(batch), self.model.tower_rows(batch)),
                                  id_bias=self.model.id_bias(batch))

    def _idle_loss(self) -> torch.Tensor:
        """A rank out of rows still steps with the others: a zero loss over an empty batch gives
        zero gradients to every dense parameter, so DDP's all_reduce buckets match."""
        raw, gates = self.ddp(torch.zeros(0, self.model.embeddings.output_dim, device=self.device))
        return sum((t.sum() for t in [raw, *(gates or {}).values()]), torch.zeros((), device=self.device)) * 0.0

    def step(self, batch, active: int = 1) -> tuple[dict[str, float], dict[str, int]]:
        """One optimiser step; `batch` None (data-parallel only) means this rank has no rows left
        while `active` other ranks still do."""
        if batch is not None:
            batch = batch.to(self.device)
        with self._autocast():
            out = self._forward(batch) if batch is not None else None
        if batch is None:
            total, losses, counts = self._idle_loss(), {}, {}
        else:
            total, losses, counts = self.loss(out, batch)
            if not math.isfinite(total.item()):
                bad = ", ".join(f"{t}={v:.4g}" for t, v in losses.items())
                raise NonFiniteLossError(
                    f"non-finite loss at step {self.global_step + 1} (per task: {bad}){self._where()}; training "
                    "stopped. Lower lr/sparse_lr, enable grad_clip, or check the input rows of this batch.")
            if active != self.dist.world_size:   # all_reduce divides by world size: mean over active ranks
                total = total * (self.dist.world_size / active)
        self.sparse_opt.zero_grad(set_to_none=True)
        self.dense_opt.zero_grad(set_to_none=True)
        total.backward()
        self.sync()
        if self.cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.dense_params, self.cfg.grad_clip)
        self.sparse_opt.step()
        self.dense_opt.step()
        self.global_step += 1
        self.rows_trained += batch.size if batch is not None else 0
        return losses, counts

    def _where(self) -> str:
        return f" on {self.dist}" if self.dist.enabled else ""

    # -- checkpoints ----------------------------------------------------------------------
    def state_dict(self, epoch: int, step_in_epoch: int, history: list[dict], current: EpochStats) -> dict:
        """Weights and optimizers are the same on every rank; what is a rank's own (its RNG, rows
        and partial-epoch statistics) is kept per rank, so each continues exactly where it was."""
        mine = {"rng": torch.get_rng_state(), "rows_trained": self.rows_trained, "current": current.as_dict()}
        ranks = self.dist.all_gather(mine)
        return {"fingerprint": self.fingerprint, "setup": self._record(), "model": self.model.state_dict(),
                "loss": self.loss.state_dict(), "sparse_opt": self.sparse_opt.state_dict(),
                "dense_opt": self.dense_opt.state_dict(), "epoch": epoch, "step_in_epoch": step_in_epoch,
                "global_step": self.global_step, "history": history, "ranks": ranks,
                "validation_steps": list(self.validation_points), **mine}

    def load_state_dict(self, state: dict) -> None:
        if state["fingerprint"] != self.fingerprint:
            what = (f"the checkpoint's settings differ from this run's (checkpoint -> now): "
                    f"{setup_differences(state['setup'], self._record())}" if "setup" in state else
                    "checkpoint was written by a different spec, model, training config, data window or number "
                    "of ranks (it predates the record of its settings)")
            raise ResumeMismatchError(what, "refusing to resume (start without --resume, or use a fresh checkpoint "
                                            "directory)")
        self.model.load_state_dict(state["model"])
        self.loss.load_state_dict(state["loss"])
        self.sparse_opt.load_state_dict(state["sparse_opt"])
        self.dense_opt.load_state_dict(state["dense_opt"])
        mine = state["ranks"][self.dist.rank] if "ranks" in state else state
        torch.set_rng_state(mine["rng"])
        self.global_step, self.rows_trained = state["global_step"], mine["rows_trained"]

    def optimizer_state(self) -> dict:
        """What a warm start continues from besides the weights: both optimizers and loss weights."""
        return {"sparse_opt": self.sparse_opt.state_dict(), "dense_opt": self.dense_opt.state_dict(),
                "loss": self.loss.state_dict()}

    def load_optimizer_state(self, state: dict) -> None:
        self.sparse_opt.load_state_dict(state["sparse_opt"])
        self.dense_opt.load_state_dict(state["dense_opt"])
        self.loss.load_state_dict(state["loss"])

    def _save(self, epoch: int, step_in_epoch: int, history: list[dict], current: EpochStats) -> None:
        if self.checkpoints is None:
            return
        state = self.state_dict(epoch, step_in_epoch, history, current)   # collective when data-parallel
        if self.dist.is_main:
            path = self.checkpoints.save(state, self.global_step)
            failpoint("training")
            log.info("checkpoint %s (epoch %d, step %d)", path, epoch, self.global_step)

    def _load_latest(self) -> dict | None:
        """Rank 0 picks the newest intact checkpoint; every rank loads that same file (work_dir must
        be shared storage when the ranks are on several machines)."""
        if self.checkpoints is None:
            raise ValueError("resume needs a checkpoint directory")
        path = self.dist.broadcast(self.checkpoints.latest() if self.dist.is_main else None)
        return None if path is None else self.checkpoints.load(path)

    # -- the loop -------------------------------------------------------------------------
    @torch.inference_mode()
    def validation_loss(self, reader: ImpressionReader) -> dict[str, float]:
        """The training loss of every task on held-out rows (same terms, same populations), so the
        validation curve is on the training curve's scale."""
        was = self.model.training
        self.model.eval()
        sums = EpochStats(0)
        for batch in reader.batches(0):
            with self._autocast():
                _, losses, counts = self.loss(self.model(batch.to(self.device)), batch.to(self.device))
            sums.add(losses, counts, batch.size)
        self.model.train(was)
        return sums.losses()

    def fit(self, reader: ImpressionReader, resume: bool = False, progress: bool | None = None,
            events: TrainingEvents | None = None, validate=None) -> TrainResult:
        """Runs the remaining epochs; data-parallel, every rank calls it with its own shard and gets
        the whole job's result (rows and accounting summed over ranks, epoch losses pooled).
        `validate()` (rank 0, after each epoch) returns the held-out figures stored with the epoch.

        With `train.validate_every_steps` N it also runs every N global steps inside an epoch: a point
        {step, epoch, samples, validation} for `events.on_validation` and `TrainResult.validation_steps`
        (checkpointed, so a resumed run keeps the earlier ones). A step that turns out to be the epoch's
        last is the epoch end's validation instead, so the figures are taken once a step: the point is
        taken before the next batch trains, when there is one (the weights are those of step N then
        too). Validation runs in eval mode without gradients and puts the RNG back, so the weights
        are bit-identical to a run without it; early stopping stays per epoch (`EarlyStopping`)."""
        events = events if events is not None and self.dist.is_main else TrainingEvents()
        every = self.cfg.validate_every_steps if validate is not None and self.dist.is_main else 0
        self.validation_points, pending = [], False
        if reader.batch_size != self.rank_batch_size:
            raise ValueError(f"reader batch_size {reader.batch_size} != this rank's share of train.batch_size "
                             f"({self.cfg.batch_size} / {self.dist.world_size} ranks)")
        history: list[dict] = []
        start_epoch, skip, resumed, current = 0, 0, None, None
        if resume:
            state = self._load_latest()
            if state is not None:
                self.load_state_dict(state)
                start_epoch, skip, history = state["epoch"], state["step_in_epoch"], list(state["history"])
                mine = state["ranks"][self.dist.rank] if "ranks" in state else state
                current = EpochStats.from_dict(mine["current"]) if skip else None
                resumed = self.global_step
                self.validation_points = list(state.get("validation_steps") or [])
                # a mid-epoch checkpoint is written before its step's validation point is taken
                pending = bool(every and skip and self.global_step % every == 0
                               and all(p["step"] != self.global_step for p in self.validation_points))
                log.info("resuming at epoch %d, batch %d (step %d)%s", start_epoch, skip, self.global_step,
                         self._where())
        accounting = RowAccounting()
        self.model.train()
        es = self.cfg.early_stopping
        if es is not None and history and _early_stop(history, self.spec, es)[1]:
            start_epoch = self.cfg.epochs   # it had stopped early before the interruption: nothing left to train
        for epoch in range(start_epoch, self.cfg.epochs):
            stats = current if current is not None and epoch == start_epoch else EpochStats(epoch)
            history_before = list(history)
            t0 = time.perf_counter() - stats.seconds
            desc = f"train epoch {epoch + 1}/{self.cfg.epochs}" + (f" (rank 0 of {self.dist.world_size})"
                                                                   if self.dist.enabled else "")
            bar = Progress(desc, total=reader.rows, unit="samples", enabled=progress if self.dist.is_main else False)
            batches = reader.batches(epoch)
            for _ in range(skip):  # same seeded order as the interrupted run: skip what it trained
                b = next(batches, None)
                if b is None:
                    break
                bar.update(b.size)
            step_in_epoch = skip
            window, t_window = EpochStats(epoch), time.perf_counter()   # since the last curve point
            for batch, active in lockstep(batches, self.dist):
                if pending:   # the previous step was not the epoch's last: its validation is a point of its own
                    paused = self._validation_point(validate, epoch, events)
                    t0, t_window, pending = t0 + paused, t_window + paused, False   # not training time
                losses, counts = self.step(batch, active)
                if batch is not None:
                    stats.add(losses, counts, batch.size)
                    window.add(losses, counts, batch.size)
                    bar.update(batch.size, **{t: f"{v:.4f}" for t, v in stats.losses().items()})  # epoch running means
                step_in_epoch += 1
                if self.global_step % self.cfg.log_every_steps == 0 and window.rows:
                    now = time.perf_counter()
                    events.on_steps({"step": self.global_step, "epoch": epoch, "samples": self.rows_trained,
                                     "samples_per_s": window.rows / max(now - t_window, 1e-9),
                                     "loss": window.losses()})
                    window, t_window = EpochStats(epoch), now
                if self.cfg.checkpoint_every and self.global_step % self.cfg.checkpoint_every == 0:
                    stats.seconds = time.perf_counter() - t0
                    self._save(epoch, step_in_epoch, history_before, stats)
                pending = bool(every and self.global_step % every == 0)
            bar.close()
            pending = False   # the epoch's last step: the epoch-end validation below is its point
            stats.seconds = time.perf_counter() - t0
            accounting = accounting.merge(reader.accounting)
            stats = _pooled(self.dist.all_gather(stats))
            record = {**stats.as_dict(), "step": self.global_step}
            if validate is not None and self.dist.is_main:
                record["validation"] = self._validated(validate)
            history = history_before + [record]
            if self.dist.is_main:
                val = record.get("validation") or {}
                log.info("epoch %d: %s rows, %.0f samples/s, loss %s%s", epoch + 1, f"{stats.rows:,}",
                         stats.rows / max(stats.seconds, 1e-9),
                         " ".join(f"{t}={v:.4f}" for t, v in stats.losses().items()),
                         "; validation loss " + " ".join(f"{t}={v:.4f}" for t, v in val.get("loss", {}).items())
                         if val else "")
                _warn_if_overfitting(history)
                events.on_epoch(record)
            skip, current = 0, None
            stop = False
            if self.cfg.early_stopping is not None:
                best, stop = self.dist.broadcast(_early_stop(history, self.spec, self.cfg.early_stopping)
                                                 if self.dist.is_main else None)
                record["best_epoch"] = best
                if best == epoch:
                    self._keep_best()
            self._save(epoch + 1, 0, history, EpochStats(epoch + 1))
            if stop:
                if self.dist.is_main:
                    log.info("early stopping after epoch %d: the validation objective has not improved since "
                             "epoch %d", epoch + 1, best + 1)
                break
        best_epoch, stopped = None, False
        if es is not None and history:
            best_epoch, stopped = self.dist.broadcast(_early_stop(history, self.spec, es)
                                                      if self.dist.is_main else None)
            stopped = stopped and len(history) < self.cfg.epochs
            if best_epoch != history[-1]["epoch"]:
                self._restore_best(best_epoch)
        if self.dist.enabled:
            log.info("%s: %d steps, the sparse table sync (%s) carried %.0f rows a step", self.dist,
                     self.sync.steps, self.sync.mode, self.sync.rows_sent / max(self.sync.steps, 1))
        parts = self.dist.all_gather((accounting, self.rows_trained))
        return TrainResult(history, self.global_step, sum(r for _, r in parts),
                           RowAccounting.total(acc for acc, _ in parts), resumed, best_epoch, stopped,
                           validation_steps=list(self.validation_points))

    def _validated(self, validate) -> dict:
        """`validate()` in eval mode without gradients, the RNG put back afterwards: held-out figures
        never change what training draws next (dropout, id dropout), wherever they are taken."""
        rng = torch.get_rng_state()
        cuda = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        self.model.eval()
        try:
            with torch.no_grad():
                return validate()
        finally:
            self.model.train()
            torch.set_rng_state(rng)
            if cuda is not None:
                torch.cuda.set_rng_state(cuda, self.device)

    def _validation_point(self, validate, epoch: int, events: TrainingEvents) -> float:
        """The validation point at the current step (rank 0); returns the seconds it took."""
        started = time.perf_counter()
        point = {"step": self.global_step, "epoch": epoch, "samples": self.rows_trained,
                 "validation": self._validated(validate)}
        self.validation_points.append(point)
        log.info("step %d (epoch %d): validation loss %s", self.global_step, epoch + 1,
                 " ".join(f"{t}={v:.4f}" for t, v in (point["validation"] or {}).get("loss", {}).items()))
        events.on_validation(point)
        return time.perf_counter() - started

    BEST = "best.pt"   # the best epoch's weights, beside the checkpoints (a resumed run restores them from here)

    def _keep_best(self) -> None:
        self._best = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        if self.dist.is_main and self.checkpoints is not None:
            from mtrank.pipeline.output_files import write_atomic

            self.checkpoints.dir.mkdir(parents=True, exist_ok=True)
            write_atomic(self.checkpoints.dir / self.BEST, lambda f: torch.save(self._best, f))

    def _restore_best(self, epoch: int) -> None:
        best = getattr(self, "_best", None)
        if best is None and self.checkpoints is not None and (self.checkpoints.dir / self.BEST).exists():
            best = self.checkpoints.load(self.checkpoints.dir / self.BEST)
        if best is None:
            raise ResumeMismatchError(f"early stopping chose epoch {epoch + 1}, whose weights are gone "
                                      f"({self.BEST} missing)", "retrain without --resume")
        self.model.load_state_dict(best)
        if self.dist.is_main:
            log.info("the model is epoch %d's weights (best validation objective)", epoch + 1)


def _early_stop(history: list[dict], spec: FeatureSpec, es: EarlyStopping) -> tuple[int, bool]:
    """(best epoch, stop now): the best validation objective so far (`es.objective`), and whether
    `patience` epochs have passed without a better one."""
    weights = {t.name: t.weight for t in spec.tasks}
    binary = [t.name for t in spec.tasks if t.type == "binary"]
    scored = []
    for e in history:
        v = e.get("validation")
        if not v:
            continue
        aucs = {t: v.get("auc", {}).get(t) for t in binary}
        aucs = {t: a for t, a in aucs.items() if a is not None}
        if es.objective == "auc" and aucs:
            total = sum(weights.get(t, 1.0) for t in aucs)
            score = -sum(weights.get(t, 1.0) * a for t, a in aucs.items()) / max(total, 1e-12)
        else:
            score = sum(weights.get(t, 1.0) * x for t, x in v["loss"].items())
        scored.append((score, e["epoch"]))
    if not scored:
        return history[-1]["epoch"], False
    best = min(scored)[1]
    return best, scored[-1][1] - best >= es.patience


def _warn_if_overfitting(history: list[dict]) -> None:
    """A task whose validation loss rose while its training loss fell since the previous epoch."""
    if len(history) < 2 or "validation" not in history[-1] or "validation" not in history[-2]:
        return
    prev, last = history[-2], history[-1]
    rising = [t for t, v in last["validation"].get("loss", {}).items()
              if t in prev["validation"].get("loss", {}) and v > prev["validation"]["loss"][t]
              and last["loss"].get(t, math.inf) < prev["loss"].get(t, -math.inf)]
    if rising:
        log.warning("epoch %d: validation loss rose while training loss fell for %s: the model is starting to "
                    "memorise the training days (fewer epochs, or see train.validation_days)",
                    last["epoch"] + 1, ", ".join(rising))


def _pooled(parts: list[EpochStats]) -> EpochStats:
    out = parts[0]
    for p in parts[1:]:
        out = out.merge(p)
    return out
