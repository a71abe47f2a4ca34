"""The names of a model's outputs, derived once from the FeatureSpec's task records.

Every stage that reads predictions (model, losses, evaluation, report, pyfunc, fusion, tuning, the
promotion gate) asks this schema for a name instead of spelling `p_<task>` itself, so a spec whose
tasks are called anything is scored, gated and fused with no code change. Pure Python: no torch.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from functools import cached_property
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mtrank.features.spec import FeatureSpec


class OutputKind(str, Enum):
    PROBABILITY = "probability"   # sigmoid of a binary task's logit, on the task's own space
    PRODUCT = "product"           # entire-space product p(parent ∧ task) = p_parent · p_task
    REGRESSION = "regression"     # a regression task's prediction in label units


@dataclass(frozen=True)
class OutputField:
    """One per-row model output.

    `figure` names it in metrics, tolerances and reports (the task or product name); `name` is its
    column in predictions. `targets` are the tasks whose labels must all be positive for the row to be
    a positive of this output (a product: parent and child), evaluated over `population`'s positives
    ('all' = every row).
    """

    name: str
    figure: str
    task: str
    kind: OutputKind
    population: str
    targets: tuple[str, ...]

    @property
    def binary(self) -> bool:
        return self.kind is not OutputKind.REGRESSION


PROBABILITY_PREFIX = "p_"


class OutputSchema:
    """All outputs of a spec, in spec order: each task's own output, then its product (if any)."""

    def __init__(self, spec: "FeatureSpec"):
        fields: list[OutputField] = []
        for t in spec.tasks:
            if t.type == "regression":
                fields.append(OutputField(t.name, t.name, t.name, OutputKind.REGRESSION, t.space, (t.name,)))
                continue
            fields.append(OutputField(PROBABILITY_PREFIX + t.name, t.name, t.name, OutputKind.PROBABILITY,
                                      t.space, (t.name,)))
            if t.parent is not None:
                parent_space = spec.task_by_name[t.parent].space
                fields.append(OutputField(PROBABILITY_PREFIX + t.product_name, t.product_name, t.name,
                                          OutputKind.PRODUCT, parent_space, (t.parent, t.name)))
        self.fields: tuple[OutputField, ...] = tuple(fields)
        names = [f.name for f in fields]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"output names collide: {', '.join(dup)} (rename a task or set its `product:`)")
        self._by_name = {f.name: f for f in fields}
        self._own = {f.task: f for f in fields if f.kind is not OutputKind.PRODUCT}
        self._product = {f.task: f for f in fields if f.kind is OutputKind.PRODUCT}

    @cached_property
    def names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.fields)

    @cached_property
    def binary(self) -> tuple[OutputField, ...]:
        """Every binary figure: tasks on their space, products over their parent's."""
        return tuple(f for f in self.fields if f.binary)

    def own(self, task: str) -> OutputField:
        """The task's own output: its probability (binary) or its prediction (regression)."""
        return self._own[task]

    def product(self, task: str) -> OutputField | None:
        """The entire-space product a child task forms with its parent, if it has a parent."""
        return self._product.get(task)

    def by_name(self, name: str) -> OutputField:
        """The output called `name`; an unknown name is an error listing the valid ones."""
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"unknown model output {name!r}; this model's outputs are: "
                           f"{', '.join(self.names)}") from None

    def __contains__(self, name: str) -> bool:
        return name in self._by_name

    def __iter__(self):
        return iter(self.fields)


def joint_positive(labels, targets: tuple[str, ...]):
    """Rows positive on every target label (numpy arrays or torch tensors): the one place the
    entire-space target 'parent ∧ task' is built."""
    y = labels[targets[0]] > 0
    for t in targets[1:]:
        y = y & (labels[t] > 0)
    return y
