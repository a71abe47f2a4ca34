"""Model hyper-parameters: a frozen, strict record so a typo in a config file fails loudly."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, ValidationError, field_validator, model_serializer, model_validator

from mtrank.features.base import StrictConfig


class EsmmConfig(StrictConfig):
    """ESMM that keeps its towers: children with a parent are trained on the entire-space product
    (as with `esmm: true`) plus a term on their own logit from the rows where their label is
    observed (their space: the parent's positives). `clicked`: + tower_weight x BCE of the child's
    logit averaged over its space; `ips`: + tower_weight x the ESCM² counterfactual regulariser,
    the child's BCE on its space's rows weighted by 1 / p_parent (detached, floored at ips_floor)
    and averaged over the parent's population. `none`: classic ESMM, the same as `esmm: true`.
    The term is folded into the task's reported loss."""

    tower_loss: Literal["none", "clicked", "ips"] = Field(
        default="clicked", description="extra term on the child's own logit: none | clicked (BCE over its space) | "
        "ips (BCE over its space weighted by 1/p_parent, averaged over the parent's population)")
    tower_weight: float = Field(default=0.5, gt=0.0, le=100.0, description="weight of the extra term, "
                                "relative to the task's entire-space term (only with tower_loss clicked | ips)")
    ips_floor: float = Field(default=0.01, gt=0.0, lt=1.0, description="ips: p_parent is clipped below at "
                             "this value, so no row weighs more than 1/ips_floor (only with tower_loss: ips)")
    tower_scope: Literal["all", "tower", "dense"] = Field(
        default="all", description="what the extra term trains: all (the child's tower, the bottom and the "
        "embeddings, like any loss) | dense (the tower and the bottom, not the embeddings: the term reads "
        "the bottom run again on detached embeddings of its rows, so id rows learn from the entire-space "
        "term alone) | tower (the child's tower only: the term reads the bottom's features detached, so "
        "the shared layers learn from the entire-space term alone; measured: classic ESMM's pCVR bias and "
        "real-data AUC with slightly stronger towers, bench/README.md)")
    detach_tables: tuple[str, ...] | None = Field(
        default=None, description="with tower_scope dense: the embedding tables whose rows the own-logit term "
        "does not train (null: every table). List the id tables (user, item), whose rows memorise clicked rows, "
        "and any feature that drives both the click and the conversion (a query's intent): measured, ESMM's pCVR "
        "bias and products under selection and the best real-data AUC, while the other tables' rows learn from "
        "the term (better towers than with every table kept out)")
    id_bias: float = Field(
        default=0.0, ge=0.0, le=10.0, description="with tower_scope dense: each child also gets one private "
        "scalar per id of every embedding table (same hashed rows and admission, zero at start), times this "
        "scale, added to its logit; the own-logit term trains them, the entire-space term reads them "
        "detached, so the child learns id effects from its labelled rows without the shared id rows "
        "learning the clicked term. 0 = off")

    @model_validator(mode="after")
    def _combinations(self):
        given = self.model_fields_set
        if self.tower_loss == "none" and "tower_weight" in given:
            raise ValueError("tower_weight needs tower_loss: clicked or ips (with none there is no tower term; "
                             "`esmm: true` is classic ESMM)")
        if self.tower_loss == "none" and "tower_scope" in given:
            raise ValueError("tower_scope needs tower_loss: clicked or ips")
        if self.detach_tables is not None and self.tower_scope != "dense":
            raise ValueError("detach_tables needs tower_scope: dense")
        if self.id_bias > 0 and self.tower_scope != "dense":
            raise ValueError("id_bias needs tower_scope: dense (the own-logit term trains the private biases "
                             "in place of the shared id rows)")
        if self.tower_loss != "ips" and "ips_floor" in given:
            raise ValueError(f"ips_floor applies to tower_loss: ips only, not {self.tower_loss!r}")
        return self

    @model_serializer(mode="wrap")
    def _only_what_applies(self, handler):
        """A dump holds only the fields that apply, so it reads back (model_config.json, job YAML)."""
        out = handler(self)
        if self.tower_loss == "none":
            out.pop("tower_weight", None)
        if self.tower_loss != "ips":
            out.pop("ips_floor", None)
        if self.tower_scope == "all":   # the default: dumps (and fingerprints) as before the option
            out.pop("tower_scope", None)
        if self.id_bias == 0:
            out.pop("id_bias", None)
        if self.detach_tables is None:
            out.pop("detach_tables", None)
        return out


class ModelConfig(StrictConfig):
    """Architecture knobs; task list and inputs come from the FeatureSpec, never from here."""

    bottom: Literal["shared_bottom", "omoe", "mmoe", "ple"] = Field(
        default="mmoe", description="shared-bottom MLP, one-gate MoE, multi-gate MoE or PLE")
    experts: int = Field(default=8, gt=0, description="MoE expert count; PLE: shared experts per level")
    expert_mlp: tuple[int, ...] = Field(default=(256, 128), min_length=1, description="hidden sizes of each "
                                        "expert (of the shared MLP for shared_bottom)")
    tower_mlp: tuple[int, ...] = Field(default=(64,), description="hidden sizes of each task tower, before its "
                                       "one-unit head")
    ple_levels: int = Field(default=2, gt=0, description="PLE: extraction levels")
    ple_task_experts: int = Field(default=1, gt=0, description="PLE: task-specific experts per task and level")
    esmm: bool | EsmmConfig = Field(
        default=EsmmConfig(tower_loss="clicked", tower_weight=0.5),
        description="false: children with a parent train on their own logit over clicked rows only; true: on "
        "the entire-space product only (classic ESMM); a mapping: ESMM plus a term that also trains the "
        "child's tower on the rows where its label is observed (see EsmmConfig). The default, ESMM + 0.5 x "
        "clicked BCE, measured best on the standard workload (bench/README.md)")
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0, description="dropout rate in experts and towers")

    @field_validator("esmm", mode="before")
    @classmethod
    def _esmm(cls, v):
        """One clear message instead of the union's two branches (`bool` and `EsmmConfig`)."""
        if isinstance(v, (bool, EsmmConfig)):
            return v
        if not isinstance(v, dict):
            raise ValueError(f"expected true, false or a mapping {{tower_loss: none | clicked | ips, tower_weight, "
                             f"ips_floor}}, got {v!r}")
        try:
            return EsmmConfig.model_validate(v)
        except ValidationError as e:
            raise ValueError("; ".join(_message(err) for err in e.errors())) from None


def _message(err) -> str:
    """`key: what is wrong` of one pydantic error, without pydantic's 'Value error, ' prefix."""
    if err["type"] == "extra_forbidden":
        msg = "unknown key"
    elif err["type"] == "value_error" and "error" in err.get("ctx", {}):
        msg = str(err["ctx"]["error"])
    else:
        msg = err["msg"]
    loc = ".".join(map(str, err["loc"]))
    return f"{loc}: {msg}" if loc else msg
