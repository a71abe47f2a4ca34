"""FeatureSpec: the one place that says which columns are features, labels and truth.

Loaded from YAML and validated at load time: unknown keys, unknown kinds, duplicate names, a
label or ground-truth column used as a feature, or a task that points at a missing task are all
errors that name the offending key. Nothing else in mtrank hard-codes column names.
"""
from __future__ import annotations

import hashlib
import json
import re
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal, Union

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from mtrank.features.base import MtrankError, StrictConfig

DEFAULT_SPEC = "default_spec.yaml"

if TYPE_CHECKING:
    from mtrank.features.outputs import OutputSchema


class SpecError(MtrankError, ValueError):
    """A FeatureSpec that cannot be used; the message names the file and key."""


_Strict = StrictConfig


_MIN_COUNT = ("ids seen fewer times in the training window share one extra 'rare' row of the table (ids never "
              "seen, at evaluation and scoring too); 1 = off: every id keeps its own row")
_SERVE_VALUE = ("the value every scoring candidate and serving request gets for this feature, whatever its column "
                "holds (there the column may be absent): a training-only input such as the slot an item was shown "
                "in, whose effect (position bias) is learnt from the logs and held fixed when ranking; evaluation "
                "reads the logged column; null = always read from the column")
_L2 = "L2 on the table's rows, applied by the sparse optimizer to the rows a step touches (0 = off)"
_DROPOUT = ("training only: probability that an id is replaced by the table's rare row (its null row without "
            "min_count); 0 = off")


class _IdRegularisation(_Strict):
    """Per-table options that make id embeddings generalise (docs/training.md, 'Id embeddings that generalise')."""

    min_count: int = Field(default=1, ge=1, description=_MIN_COUNT)
    l2: float = Field(default=0.0, ge=0.0, allow_inf_nan=False, description=_L2)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0, description=_DROPOUT)


_ID_OPTIONS = ("min_count", "l2", "dropout")


class TableSpec(_IdRegularisation):
    buckets: int = Field(gt=1, description="rows of the table; id 0 is reserved for null")
    dim: int | None = Field(default=None, gt=0, description="embedding dim; null = the spec's embedding_dim")


class _HashedFeature(_IdRegularisation):
    """What every hashed feature has: its column and the embedding table its ids index. The id options
    (min_count, l2, dropout) of the feature's own table are set on the feature; those of a shared table
    on its `tables:` entry."""

    name: str = Field(description="column name in the logs and candidates")
    table: str | None = Field(default=None, description="a shared table declared under `tables`; null = the "
                                                        "feature's own table")
    buckets: int | None = Field(default=None, gt=1, description="rows of the feature's own table (required "
                                                               "without `table`); id 0 is reserved for null")
    dim: int | None = Field(default=None, gt=0, description="embedding dim of the own table; null = the spec's "
                                                           "embedding_dim")

    @model_validator(mode="after")
    def _shared_table_options(self) -> "_HashedFeature":
        # a saved spec writes every default out, so only a value other than the default is an error
        on_feature = [k for k in _ID_OPTIONS if getattr(self, k) != type(self).model_fields[k].default]
        if self.table is not None and on_feature:
            raise ValueError(f"{', '.join(on_feature)}: set on table {self.table!r} (under tables:), not on a "
                             "feature that shares it")
        return self


class CategoricalFeature(_HashedFeature):
    kind: Literal["categorical"] = Field(description="one id per row (strings or integers), hashed")
    serve_value: int | str | None = Field(default=None, description=_SERVE_VALUE)


class MultiHotFeature(_HashedFeature):
    kind: Literal["multi_hot"] = Field(description="a list of ids per row (a null list is an empty bag)")
    pooling: Literal["sum", "mean"] = Field(default="mean", description="how a row's embeddings are combined")


class NumericFeature(_Strict):
    """Transforms apply in a fixed order: fill -> clip -> log1p -> (standardize | bucketize)."""

    name: str = Field(description="column name in the logs and candidates")
    kind: Literal["numeric"] = Field(description="a number per row (integers or floats)")
    fill: float | None = Field(default=None, description="value for nulls; no fill = null is a bad row")
    serve_value: float | None = Field(default=None, allow_inf_nan=False, description=_SERVE_VALUE)
    clip: tuple[float, float] | None = Field(default=None, description="[lower, upper] bounds, after fill")
    log1p: bool = Field(default=False, description="log1p of max(x, 0), after clip")
    standardize: bool = Field(default=False, description="subtract the mean and divide by the standard "
                                                        "deviation fitted on the training window (saved with the model)")
    boundaries: tuple[float, ...] | None = Field(
        default=None, description="bucketize into an embedding table instead of a dense input")
    dim: int | None = Field(default=None, gt=0, description="embedding dim when bucketized")
    encoding: Literal["scalar", "piecewise_linear"] = Field(
        default="scalar", description="dense input: scalar = one column (the transformed value); "
        "piecewise_linear = `bins` columns, component t = clamp((x - b[t-1]) / (b[t] - b[t-1]), 0, 1) (first "
        "bin open below, last open above) over quantile edges b fitted on the training window (saved with "
        "the model)")
    bins: int | None = Field(default=None, description="piecewise_linear: number of bins (>= 2), i.e. dense "
                             "columns; fewer distinct training values than bins + 1 leave the extra columns 0")
    keep_value: bool = Field(default=False, description="piecewise_linear: also feed the scalar value (after "
                             "standardize, when set) as a column before the bins")

    @model_validator(mode="after")
    def _check(self) -> "NumericFeature":
        if self.clip is not None and not self.clip[0] <= self.clip[1]:
            raise ValueError(f"clip lower bound {self.clip[0]} > upper bound {self.clip[1]}")
        if self.encoding == "piecewise_linear":
            if self.boundaries is not None:
                raise ValueError("encoding piecewise_linear and boundaries exclude each other")
            if self.bins is None or self.bins < 2:
                raise ValueError(f"encoding piecewise_linear needs bins >= 2, got {self.bins}")
            if self.standardize and not self.keep_value:
                raise ValueError("standardize applies to the scalar value: with encoding piecewise_linear it "
                                 "needs keep_value: true")
        elif self.bins is not None or self.keep_value:
            raise ValueError("bins and keep_value are only meaningful with encoding: piecewise_linear")
        if self.boundaries is not None:
            if self.standardize:
                raise ValueError("standardize and boundaries exclude each other")
            b = self.boundaries
            if len(b) == 0 or any(x >= y for x, y in zip(b, b[1:])):
                raise ValueError("boundaries must be non-empty and strictly increasing")
        elif self.dim is not None:
            raise ValueError("dim is only meaningful with boundaries (bucketized numeric)")
        return self

    @property
    def bucketized(self) -> bool:
        return self.boundaries is not None

    @property
    def piecewise_linear(self) -> bool:
        return self.encoding == "piecewise_linear"

    @property
    def dense_width(self) -> int:
        """Dense input columns of this feature: 0 bucketized, `bins` (+ 1 with keep_value) piecewise
        linear, else 1."""
        if self.bucketized:
            return 0
        if self.piecewise_linear:
            return self.bins + int(self.keep_value)
        return 1


Feature = Annotated[Union[CategoricalFeature, MultiHotFeature, NumericFeature], Field(discriminator="kind")]


# A task's name names MLflow metrics and tags (which allow letters, digits, '_', '-', '.', ' ', ':'
# and '/'), the outputs p_<name> and the report's rows: the characters all of them take.
TASK_NAME = re.compile(r"\w[\w\-. ]*")
TASK_NAME_RULE = "letters, digits, '_', '-', '.' and spaces, starting with a letter, digit or '_'"


def task_name_for(label: str) -> str:
    """A valid task name for a label column (init-spec): other characters become '_'."""
    name = re.sub(r"[^\w\-. ]", "_", label).rstrip()
    return name if TASK_NAME.fullmatch(name) else f"_{name}"


class TaskSpec(_Strict):
    """One record per task: everything the trainer and evaluator need, no model-type branches."""

    name: str = Field(description="task name: names its output (p_<name> or <name>), metrics and tolerances; "
                                  "letters, digits, '_', '-', '.' and spaces (init-spec maps a label's other "
                                  "characters to '_')")
    label: str = Field(description="label column: 0/1 or booleans for binary tasks, numbers for regression")
    type: Literal["binary", "regression"] = Field(description="binary: a probability; regression: a value in "
                                                               "label units")
    loss: Literal["bce", "mse", "mse_log1p"] = Field(default="bce", description="bce for binary tasks; mse or "
                                                     "mse_log1p (MSE on log1p of the label) for regression")
    weight: float = Field(default=1.0, ge=0.0, description="loss weight under train.loss_weighting: fixed")
    space: str = Field(default="all", description="'all' or the task whose positives form the population")
    parent: str | None = Field(default=None, description="entire-space product: p(this & parent) = p_parent * p_this")
    product: str | None = Field(default=None, description="name of the entire-space product (default "
                                "'<parent>_<name>'); only with a parent")

    @field_validator("name", "product")
    @classmethod
    def _plain_name(cls, v: str | None) -> str | None:
        if v is not None and not TASK_NAME.fullmatch(v):
            raise ValueError(f"{v!r} is not a task name: {TASK_NAME_RULE} (it names MLflow metrics, outputs "
                             "and report rows; the label column may be named anything)")
        return v

    @model_validator(mode="after")
    def _check(self) -> "TaskSpec":
        if self.type == "binary" and self.loss != "bce":
            raise ValueError(f"binary task needs loss 'bce', got {self.loss!r}")
        if self.type == "regression" and self.loss == "bce":
            raise ValueError("regression task needs loss 'mse' or 'mse_log1p'")
        if self.parent is not None and self.type != "binary":
            raise ValueError("only binary tasks can have an entire-space parent")
        if self.product is not None and self.parent is None:
            raise ValueError("product names an entire-space product: it needs a parent")
        return self

    @property
    def product_name(self) -> str | None:
        """The entire-space product's name (metrics key and output stem), None without a parent."""
        if self.parent is None:
            return None
        return self.product or f"{self.parent}_{self.name}"

    @property
    def nonnegative_label(self) -> bool:
        """log1p targets are only defined for labels >= 0 (dwell time, counts)."""
        return self.loss == "mse_log1p"


class FeatureSpec(_Strict):
    version: Literal[1] = Field(default=1, description="spec format version")
    hash_seed: int = Field(ge=0, lt=2**64, description="seed of every table's id hash; changing it changes "
                                                      "every id")
    embedding_dim: int = Field(default=16, gt=0, description="embedding dim of tables that set none")
    on_bad_row: Literal["fail", "quarantine"] = Field(default="fail", description="a row breaking a row rule: "
                                                      "fail naming file, column and rule, or set it aside (counted)")
    duplicate_rows: Literal["keep", "reject"] = Field(
        default="keep", description="exact copies of an earlier row of the window (same features and labels): "
                                    "kept, or rejected and counted as row:duplicate_row (the first copy stays)")
    allow_empty_partitions: bool = Field(default=False, description="accept a missing or empty day partition "
                                                                    "in a window instead of failing")
    request_id: str | None = Field(default="request_id", description="groups candidates into one ranked "
                                   "list; needed by scoring and fusion tuning only (null: absent)")
    group_key: str | None = Field(default="user_id", description="GAUC groups (e.g. the user); null: no "
                                  "GAUC, and the column is not required")
    timestamp: str | None = Field(default="ts", description="event time; used by scoring's serving order "
                                  "only (null: absent)")
    tables: dict[str, TableSpec] = Field(default_factory=dict, description="embedding tables shared by "
                                                                           "several features, by name")
    features: tuple[Feature, ...] = Field(description="the model's inputs, chosen by `kind`")
    tasks: tuple[TaskSpec, ...] = Field(description="one record per task")
    ground_truth: dict[str, str] = Field(default_factory=dict, description="task -> column of its true "
                                         "probability (generated logs only): oracle metrics, never a feature")

    @field_validator("features")
    @classmethod
    def _unique_features(cls, feats: tuple) -> tuple:
        seen: set[str] = set()
        for f in feats:
            if f.name in seen:
                raise ValueError(f"duplicate feature name {f.name!r}")
            seen.add(f.name)
        if not feats:
            raise ValueError("at least one feature is required")
        return feats

    @model_validator(mode="after")
    def _cross_check(self) -> "FeatureSpec":
        names = {t.name for t in self.tasks}
        if len(names) != len(self.tasks):
            raise ValueError("tasks: duplicate task name")
        if not self.tasks:
            raise ValueError("tasks: at least one task is required")
        by_name = {t.name: t for t in self.tasks}
        for t in self.tasks:
            if t.space != "all":
                root = by_name.get(t.space)
                if root is None:
                    raise ValueError(f"tasks.{t.name}.space: unknown task {t.space!r} (use 'all' or a task name)")
                if root.type != "binary" or root.space != "all":
                    raise ValueError(f"tasks.{t.name}.space: {t.space!r} must be a binary task trained on 'all'")
            if t.parent is not None:
                p = by_name.get(t.parent)
                if p is None:
                    raise ValueError(f"tasks.{t.name}.parent: unknown task {t.parent!r}")
                if p.type != "binary" or p.space != "all":
                    raise ValueError(f"tasks.{t.name}.parent: {t.parent!r} must be a binary task trained on 'all'")
                if t.space != t.parent:
                    raise ValueError(f"tasks.{t.name}: an entire-space child must be trained on its parent's "
                                     f"positives (space: {t.parent})")
        products = [t.product_name for t in self.tasks if t.parent is not None]
        for name in products:
            if name in by_name or products.count(name) > 1:
                raise ValueError(f"tasks: product name {name!r} is used twice (task and product names share "
                                 "one namespace; set `product:` on the task)")
        for task in self.ground_truth:
            if task not in by_name:
                raise ValueError(f"ground_truth.{task}: unknown task")
        # Leakage: labels and truth never become inputs.
        forbidden = {t.label: f"the label of task {t.name!r}" for t in self.tasks}
        forbidden.update({c: f"the ground-truth column of task {k!r}" for k, c in self.ground_truth.items()})
        for f in self.features:
            if f.name in forbidden:
                raise ValueError(f"features.{f.name}: column is {forbidden[f.name]} and cannot be a feature")
        # Tables: a feature either owns an implicit table (buckets/dim on the feature) or names one.
        for f in self.features:
            if isinstance(f, NumericFeature):
                continue
            if f.table is not None:
                if f.table not in self.tables:
                    raise ValueError(f"features.{f.name}.table: unknown table {f.table!r} (declare it under tables)")
                if f.buckets is not None or f.dim is not None:
                    raise ValueError(f"features.{f.name}: set buckets/dim on table {f.table!r}, not on the feature")
            else:
                if f.buckets is None:
                    raise ValueError(f"features.{f.name}.buckets: required when the feature has no shared table")
                if f.name in self.tables:
                    raise ValueError(f"features.{f.name}: a table of the same name exists; set table: {f.name}")
        used = {f.table for f in self.features if not isinstance(f, NumericFeature) and f.table}
        for t in self.tables:
            if t not in used:
                raise ValueError(f"tables.{t}: declared but no feature uses it")
        return self

    # ----- derived views (cached; the spec is frozen) -------------------------------------
    @cached_property
    def categorical(self) -> tuple[CategoricalFeature, ...]:
        return tuple(f for f in self.features if isinstance(f, CategoricalFeature))

    @cached_property
    def multi_hot(self) -> tuple[MultiHotFeature, ...]:
        return tuple(f for f in self.features if isinstance(f, MultiHotFeature))

    @cached_property
    def numeric(self) -> tuple[NumericFeature, ...]:
        return tuple(f for f in self.features if isinstance(f, NumericFeature))

    @cached_property
    def dense(self) -> tuple[NumericFeature, ...]:
        """Numeric features that enter the model as a dense float column."""
        return tuple(f for f in self.numeric if not f.bucketized)

    @cached_property
    def embedding_tables(self) -> dict[str, "EmbeddingTable"]:
        """Every embedding table, with the fields (in spec order) that look it up together."""
        out: dict[str, EmbeddingTable] = {}
        for f in self.features:
            if isinstance(f, NumericFeature):
                if not f.bucketized:
                    continue
                name, buckets, dim = f.name, len(f.boundaries) + 2, f.dim  # 0 = null, 1.. = buckets
                opts: tuple = (1, 0.0, 0.0)
            elif f.table is not None:
                t = self.tables[f.table]
                name, buckets, dim, opts = f.table, t.buckets, t.dim, (t.min_count, t.l2, t.dropout)
            else:
                name, buckets, dim, opts = f.name, f.buckets, f.dim, (f.min_count, f.l2, f.dropout)
            tab = out.get(name)
            if tab is None:
                out[name] = EmbeddingTable(name, buckets, dim or self.embedding_dim, (f.name,), *opts)
            else:
                out[name] = EmbeddingTable(name, tab.buckets, tab.dim, tab.fields + (f.name,), tab.min_count, tab.l2,
                                           tab.dropout)
        return out

    @cached_property
    def id_fields(self) -> tuple[tuple[str, str], ...]:
        """(field, table) of every single-valued id field, grouped by table: the columns of the id matrix."""
        return tuple((f, t.name) for t in self.embedding_tables.values() for f in t.fields
                     if not isinstance(self.feature_by_name[f], MultiHotFeature))

    @cached_property
    def bag_tables(self) -> dict[str, tuple[str, ...]]:
        """table -> its multi-hot fields (pooled bags), for tables that have any."""
        out: dict[str, tuple[str, ...]] = {}
        for t in self.embedding_tables.values():
            bags = tuple(f for f in t.fields if isinstance(self.feature_by_name[f], MultiHotFeature))
            if bags:
                out[t.name] = bags
        return out

    @cached_property
    def feature_by_name(self) -> dict[str, Feature]:
        return {f.name: f for f in self.features}

    @cached_property
    def task_by_name(self) -> dict[str, TaskSpec]:
        return {t.name: t for t in self.tasks}

    @cached_property
    def outputs(self) -> "OutputSchema":
        """The names of every model output this spec's tasks produce."""
        from mtrank.features.outputs import OutputSchema

        return OutputSchema(self)

    def space_label(self, task: TaskSpec) -> str | None:
        """Label column whose positives define the task's population (None = all rows)."""
        return None if task.space == "all" else self.task_by_name[task.space].label

    @cached_property
    def required_columns(self) -> tuple[str, ...]:
        """Columns a training row needs: features and labels (request_id matters to scoring only)."""
        return tuple(dict.fromkeys([*self.feature_columns, *(t.label for t in self.tasks)]))

    @cached_property
    def feature_columns(self) -> tuple[str, ...]:
        """Columns the model reads from a row (what a scoring candidate needs)."""
        return tuple(dict.fromkeys([*self.group_columns, *(f.name for f in self.features)]))

    def request_column(self, stage: str) -> str:
        """The request id column, for a stage that ranks rows per request (it is optional in the spec)."""
        if self.request_id is None:
            raise SpecError(f"the model's FeatureSpec has request_id: null; {stage} ranks rows per request and "
                            "needs a request id column (set request_id in the spec)")
        return self.request_id

    @cached_property
    def group_columns(self) -> tuple[str, ...]:
        """The GAUC group column, if the spec names one (it is optional)."""
        return (self.group_key,) if self.group_key else ()

    @cached_property
    def served_values(self) -> dict[str, int | float | str]:
        """feature -> the value scoring and serving give it (features with `serve_value` only)."""
        return {f.name: f.serve_value for f in self.features if getattr(f, "serve_value", None) is not None}

    @cached_property
    def serving_columns(self) -> tuple[str, ...]:
        """Columns a scoring candidate or serving request needs: the feature columns but those whose
        value serving sets itself."""
        return tuple(c for c in self.feature_columns if c not in self.served_values)

    def fingerprint(self) -> str:
        """Stable content hash: two specs hash the same iff they hash and transform identically.
        An unset `serve_value` is left out, so specs written before it existed keep their hash."""
        d = self.model_dump(mode="json")
        for f in d["features"]:
            if f.get("serve_value", 0) is None:
                del f["serve_value"]
        blob = json.dumps(d, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json", exclude_defaults=False), sort_keys=False)


class EmbeddingTable:
    """An embedding table and the fields that share it (looked up in one call), with its id options.

    With `min_count` > 1 the table has one row more than its buckets: row `buckets` is the shared
    'rare' row of the ids not admitted (seen fewer than min_count times in the training window)."""

    __slots__ = ("name", "buckets", "dim", "fields", "min_count", "l2", "dropout")

    def __init__(self, name: str, buckets: int, dim: int, fields: tuple[str, ...], min_count: int = 1,
                 l2: float = 0.0, dropout: float = 0.0):
        self.name, self.buckets, self.dim, self.fields = name, buckets, dim, fields
        self.min_count, self.l2, self.dropout = min_count, l2, dropout

    @property
    def rare_id(self) -> int | None:
        """The rare row's id within the table, None without admission (min_count 1)."""
        return self.buckets if self.min_count > 1 else None

    @property
    def rows(self) -> int:
        """Rows of the table's embedding: the buckets, plus the rare row with admission."""
        return self.buckets + (self.min_count > 1)

    def __repr__(self) -> str:
        opts = "".join(f", {k}={getattr(self, k)}" for k, d in (("min_count", 1), ("l2", 0.0), ("dropout", 0.0))
                       if getattr(self, k) != d)
        return f"EmbeddingTable({self.name!r}, buckets={self.buckets}, dim={self.dim}, fields={self.fields}{opts})"


def _format_error(source: str, err: ValidationError, raw: dict) -> str:
    lines = [f"{source}: invalid FeatureSpec"]
    for e in err.errors():
        loc = list(e["loc"])
        # Name features/tasks by their `name` rather than a bare index, and drop pydantic's union tags.
        parts: list[str] = []
        node: object = raw
        for p in loc:
            if isinstance(p, int) and isinstance(node, list) and p < len(node):
                node = node[p]
                label = node.get("name") if isinstance(node, dict) else None
                parts[-1] = f"{parts[-1]}[{p}]" + (f"({label})" if label else "")
                continue
            if isinstance(node, dict) and p in node:
                node = node[p]
            elif isinstance(node, dict) and p in ("categorical", "multi_hot", "numeric"):
                continue  # discriminator tag, not a key
            parts.append(str(p))
        where = ".".join(parts) or "<root>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] == "union_tag_invalid":
            msg = f"unknown kind {e.get('input', {}).get('kind') if isinstance(e.get('input'), dict) else ''!r}; " \
                  "expected categorical, multi_hot or numeric"
        msg = msg.removeprefix("Value error, ")
        lines.append(f"  {msg}" if where == "<root>" else f"  {where}: {msg}")
    return "\n".join(lines)


def parse_spec(raw: dict, source: str = "<spec>") -> FeatureSpec:
    if not isinstance(raw, dict):
        raise SpecError(f"{source}: a FeatureSpec must be a mapping, got {type(raw).__name__}")
    try:
        return FeatureSpec.model_validate(raw)
    except ValidationError as err:
        raise SpecError(_format_error(source, err, raw)) from None


def read_yaml(path: str | Path | None, package: str, default: str, what: str) -> tuple[object, str, Path | None]:
    """(document, source name, folder) of a YAML config, or of `package`'s embedded `default`.

    safe_load only: configs are data, never code. Errors name the file and what it should be.
    """
    if path is None:
        text = resources.files(f"mtrank.{package}").joinpath(default).read_text()
        source, base = f"{package}/{default}", None
    else:
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as e:
            raise SpecError(f"{path}: cannot read {what} ({e.strerror})") from None
        source, base = str(path), path.resolve().parent
    try:
        return yaml.safe_load(text), source, base
    except yaml.YAMLError as e:
        raise SpecError(f"{source}: not valid YAML: {e}") from None


def load_spec(path: str | Path | None = None) -> FeatureSpec:
    """Load a FeatureSpec YAML; None = the default spec."""
    raw, source, _ = read_yaml(path, "features", DEFAULT_SPEC, "FeatureSpec")
    return parse_spec(raw, source)
