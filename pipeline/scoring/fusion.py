"""The weighted multiplicative fusion over named factors, as pure column arithmetic.

score = Π_i (offset_i + value_i) ^ exponent_i × rule_weight, where each value is a model output named
by the spec's `OutputSchema` or a candidate column. A `FusionConfig` is resolved against the model's
outputs once (`resolve`), so a name the model does not have fails before any row is scored. Every
factor is kept as its own column so a ranked list can be explained term by term.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace

import numpy as np

from mtrank.features.base import MtrankError
from mtrank.features.outputs import OutputField, OutputKind, OutputSchema
from mtrank.pipeline.scoring.config import FactorSearch, FusionConfig
from mtrank.pipeline.scoring.fate import Fate


class ScoringError(MtrankError, ValueError):
    """Predictions or candidates the scorer cannot use; says which column, rule and rows."""


def recalibrate(p: np.ndarray, keep_rate: float) -> np.ndarray:
    """Undo negative down-sampling at keep rate r: p' = p / (p + (1 - p) / r)."""
    if keep_rate == 1.0:
        return p
    return p / (p + (1.0 - p) / keep_rate)


def _check(name: str, x: np.ndarray, lo: float, hi: float, ids: np.ndarray | None) -> None:
    bad = ~((x >= lo) & (x <= hi))  # NaN fails both comparisons
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        where = f" (first at candidate {ids[i]!r})" if ids is not None else ""
        kind = "NaN" if np.isnan(x[i]) else f"{x[i]!r}"
        raise ScoringError(f"prediction {name}: {int(bad.sum()):,} values outside [{lo}, {hi}] or NaN, "
                           f"e.g. {kind}{where}; a model that emits these cannot be fused")


@dataclass(frozen=True)
class ResolvedFactor:
    label: str
    output: OutputField | None
    column: str | None
    offset: float
    exponent: float
    on_bad_value: str
    search: FactorSearch | None

    @property
    def column_name(self) -> str:
        return f"factor_{self.label}"

    @property
    def source(self) -> str:
        return self.output.name if self.output is not None else self.column  # type: ignore[return-value]

    @property
    def term(self) -> str:
        """The factor as the formula writes it, e.g. `(0.05 + p_b)` or `dwell^0.2`: what its column holds."""
        base = self.source if self.offset == 0 else f"({self.offset:g} + {self.source})"
        return base if self.exponent == 1 else f"{base}^{self.exponent:g}"


@dataclass(frozen=True)
class FusionPlan:
    """A FusionConfig checked against one model's outputs: what `fuse` and the tuner run."""

    factors: tuple[ResolvedFactor, ...]
    keep_rates: dict[str, float]          # task -> keep rate of its negatives
    schema: OutputSchema

    @property
    def factor_columns(self) -> tuple[str, ...]:
        return tuple(f.column_name for f in self.factors)

    @property
    def columns(self) -> tuple[str, ...]:
        """Candidate columns the formula reads."""
        return tuple(dict.fromkeys(f.column for f in self.factors if f.column is not None))

    def required_outputs(self, searching: bool = False) -> list[str]:
        """Outputs the formula needs (an exponent of 0 switches its factor off), with the task
        probabilities a re-calibrated product is rebuilt from; `searching`: also those of factors
        switched off now whose exponent the tuner may switch on."""
        need = []
        for f in self.factors:
            live = f.exponent != 0 or (searching and f.search is not None and f.search.exponent is not None)
            if f.output is None or not live:
                continue
            need.append(f.output.name)
            if f.output.kind is OutputKind.PRODUCT and self._recalibrated(f.output):
                need += [self.schema.own(t).name for t in f.output.targets]
        return list(dict.fromkeys(need))

    def _recalibrated(self, out: OutputField) -> bool:
        return any(self.keep_rates.get(t, 1.0) != 1.0 for t in out.targets)

    # ----- the tuner's view: free parameters "<factor>.offset" / "<factor>.exponent" -------------
    def bounds(self) -> dict[str, tuple[float, float, bool]]:
        """Searchable parameters -> (low, high, log-uniform?), from each factor's `search`."""
        out = {}
        for f in self.factors:
            s = f.search
            if s is None:
                continue
            if s.offset is not None:
                out[f"{f.label}.offset"] = (s.offset.lo, s.offset.hi, True)
            if s.exponent is not None:
                out[f"{f.label}.exponent"] = (s.exponent.lo, s.exponent.hi, False)
        return out

    def params(self) -> dict[str, float]:
        """Every factor's offset and exponent, by parameter name."""
        return {k: v for f in self.factors
                for k, v in ((f"{f.label}.offset", f.offset), (f"{f.label}.exponent", f.exponent))}

    def with_params(self, params: Mapping[str, float]) -> "FusionPlan":
        unknown = sorted(set(params) - set(self.params()))
        if unknown:
            raise ValueError(f"unknown fusion parameter(s) {', '.join(unknown)}; the plan has: "
                             f"{', '.join(self.params())}")
        factors = tuple(replace(f, offset=float(params.get(f"{f.label}.offset", f.offset)),
                                exponent=float(params.get(f"{f.label}.exponent", f.exponent)))
                        for f in self.factors)
        return replace(self, factors=factors)

    def formula(self) -> str:
        """The formula in words, e.g. `p_a · (0.05 + p_b) · (1 + price) · dwell^0.2 · rule_weight`."""
        return " · ".join([f.term for f in self.factors] + ["rule_weight"])


def default_factors(schema: OutputSchema) -> tuple[ResolvedFactor, ...]:
    """No configured factors: rank by the probability of the first binary task trained on all rows."""
    for f in schema.binary:
        if f.kind is OutputKind.PROBABILITY and f.population == "all":
            return (ResolvedFactor(f.name, f, None, 0.0, 1.0, "zero", None),)
    first = schema.fields[0]
    return (ResolvedFactor(first.name, first, None, 0.0, 1.0, "zero", None),)


def resolve(cfg: FusionConfig, schema: OutputSchema, trained_keep_rate: tuple[str, float] | None = None) -> FusionPlan:
    """Check every factor and keep rate against the model's outputs; errors name the key and list
    the valid names. `trained_keep_rate`: (task, rate) the model was trained with by mtrank, which
    already corrected its output for it (recalibrating again would divide twice)."""
    tasks = {f.task for f in schema.fields if f.kind is OutputKind.PROBABILITY}
    for task in cfg.negative_keep_rate:
        if task not in tasks:
            raise ScoringError(f"fusion.negative_keep_rate.{task}: not a binary task of the model; its binary "
                               f"tasks are: {', '.join(sorted(tasks))}")
        if trained_keep_rate is not None and trained_keep_rate[0] == task:
            raise ScoringError(f"fusion.negative_keep_rate.{task}: the model was trained on {task} negatives kept "
                               f"at {trained_keep_rate[1]:g} and its output is already recalibrated for it; remove "
                               "this setting (it is for models trained on down-sampled data elsewhere)")
    if cfg.factors is None:
        return FusionPlan(default_factors(schema), dict(cfg.negative_keep_rate), schema)
    factors = []
    for i, f in enumerate(cfg.factors):
        out = None
        if f.output is not None:
            if f.output not in schema:
                raise ScoringError(f"fusion.factors[{i}].output: the model has no output {f.output!r}; its "
                                   f"outputs are: {', '.join(schema.names)}")
            out = schema.by_name(f.output)
        factors.append(ResolvedFactor(f.label, out, f.column, f.offset, f.exponent, f.on_bad_value, f.search))
    return FusionPlan(tuple(factors), dict(cfg.negative_keep_rate), schema)


def _output_values(plan: FusionPlan, out: OutputField, outputs: Mapping[str, np.ndarray],
                   ids: np.ndarray | None) -> np.ndarray:
    """An output's values, probabilities checked in [0, 1] and re-calibrated for down-sampling."""
    def prob(name: str, task: str) -> np.ndarray:
        x = np.asarray(outputs[name], dtype=np.float64)
        _check(name, x, 0.0, 1.0, ids)
        return recalibrate(x, plan.keep_rates.get(task, 1.0))

    if out.kind is OutputKind.REGRESSION:
        x = np.asarray(outputs[out.name], dtype=np.float64)
        _check(out.name, x, -math.inf, math.inf, ids)
        return x
    if out.kind is OutputKind.PRODUCT and plan._recalibrated(out):
        v = np.ones(len(outputs[out.name]))
        for t in out.targets:
            v = v * prob(plan.schema.own(t).name, t)
        return v
    return prob(out.name, out.task)


def fuse(outputs: Mapping[str, np.ndarray], columns: Mapping[str, np.ndarray], rule_weight: np.ndarray,
         plan: FusionPlan, ids: np.ndarray | None = None) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """(columns, flags, eligible): one `factor_<label>` column per factor, `rule_weight` and `score`;
    VALUE_DEFAULTED / FILTERED_VALUE bits for column factors with missing, NaN or <= 0 values.

    A column factor with on_bad_value "error" raises naming the column; the caller checks that first
    when it wants the request id in the message."""
    missing = [k for k in plan.required_outputs() if k not in outputs]
    if missing:
        raise ScoringError(f"the predictions have no output {', '.join(missing)}; the fusion formula needs it "
                           "(set its factor's exponent to 0 to score without it)")
    n = len(rule_weight)
    flags = np.zeros(n, np.int16)
    eligible = np.ones(n, bool)
    cols: dict[str, np.ndarray] = {}
    score = np.asarray(rule_weight, dtype=np.float64).copy()
    for f in plan.factors:
        if f.exponent == 0:          # 0 ** 0 == 1: a zero exponent switches a factor off
            cols[f.column_name] = np.ones(n)
            continue
        if f.output is not None:
            value = _output_values(plan, f.output, outputs, ids)
        else:
            if f.column not in columns:
                raise ScoringError(f"candidates have no column {f.column!r} (fusion factor {f.label!r})")
            value = np.asarray(columns[f.column], dtype=np.float64)
            bad = ~(value > 0)       # NaN, 0, negative
            if bad.any():
                if f.on_bad_value == "error":
                    raise ScoringError(f"column {f.column!r}: rule on_bad_value: {int(bad.sum()):,} candidates have "
                                       f"a missing, NaN or non-positive value; set the factor's on_bad_value to "
                                       "zero or filter")
                flags |= np.where(bad, np.int16(Fate.VALUE_DEFAULTED if f.on_bad_value == "zero"
                                                else Fate.FILTERED_VALUE), np.int16(0))
                if f.on_bad_value == "filter":
                    eligible &= ~bad
                value = np.where(bad, 0.0, value)
        base = f.offset + value
        if (base < 0).any():
            i = int(np.flatnonzero(base < 0)[0])
            raise ScoringError(f"fusion factor {f.label!r}: offset + {f.source} is negative ({base[i]:.4g}); a "
                               "factor's base must be >= 0 (raise its offset)")
        cols[f.column_name] = base if f.exponent == 1 else np.power(base, f.exponent)
        score *= cols[f.column_name]
    cols["rule_weight"] = np.asarray(rule_weight, dtype=np.float64)
    cols["score"] = score
    return cols, flags, eligible
