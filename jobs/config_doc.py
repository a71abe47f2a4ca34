"""The configuration reference, generated from the config models themselves.

`python -m mtrank.jobs.config_doc > docs/config-reference.md` walks the job config (`JobConfig` and
every model nested in it, the scoring config included) and the FeatureSpec, and writes one Markdown
table per model: field, type, default, description. The descriptions are the models' own
`Field(description=...)`, so the reference changes only when the models do; a test checks that the
committed file equals this output and that every field is described.
"""
from __future__ import annotations

import inspect
import json
import sys
import types
import typing
from dataclasses import dataclass, field

import annotated_types as at
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from mtrank.features.spec import FeatureSpec
from mtrank.jobs.config import JobConfig

COMMAND = "python -m mtrank.jobs.config_doc > docs/config-reference.md"

SUPPLEMENT: dict[tuple[str, str], str] = {}   # descriptions for models that cannot carry their own (none left)


@dataclass
class Entry:
    model: type[BaseModel]
    paths: list[str] = field(default_factory=list)


# ----- walking the models ---------------------------------------------------------------------

def _unwrap(tp: object) -> object:
    """Annotated[X, ...] -> X."""
    while typing.get_origin(tp) is typing.Annotated:
        tp = typing.get_args(tp)[0]
    return tp


def _nested(tp: object) -> list[tuple[type[BaseModel], str]]:
    """Models inside an annotation, each with the path suffix that reaches it ('' or '[]')."""
    tp = _unwrap(tp)
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return [(tp, "")]
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (tuple, list):
        return [(m, "[]") for a in args if a is not Ellipsis for m, _ in _nested(a)]
    if origin is dict:
        return [(m, ".NAME") for m, _ in _nested(args[1])]
    if origin in (typing.Union, types.UnionType):
        return [x for a in args for x in _nested(a)]
    return []


def _key(name: str, info: FieldInfo) -> str:
    return info.alias or name


def walk(root: type[BaseModel], path: str = "") -> dict[type[BaseModel], Entry]:
    """Every model reachable from `root`, breadth first in field order, with the YAML paths to it."""
    out: dict[type[BaseModel], Entry] = {root: Entry(root, [path] if path else [])}
    queue = [(root, path)]
    while queue:
        model, at_path = queue.pop(0)
        for name, info in model.model_fields.items():
            for sub, suffix in _nested(info.annotation):
                sub_path = (f"{at_path}." if at_path else "") + _key(name, info) + suffix
                entry = out.get(sub)
                if entry is None:
                    out[sub] = Entry(sub, [sub_path])
                    queue.append((sub, sub_path))
                elif sub_path not in entry.paths:
                    entry.paths.append(sub_path)
    return out


def sections() -> list[tuple[str, str, dict[type[BaseModel], Entry]]]:
    return [
        ("Job config", "The YAML given to `mtrank train|daily|promote|lineage|score|tune-fusion --config`; "
                       "the embedded default is `jobs/default_job.yaml`. Relative paths resolve against the "
                       "config file's folder.", walk(JobConfig)),
        ("FeatureSpec", "The YAML named by the job's `spec:` (or `mtrank validate --spec`); the embedded "
                        "default, for generated logs, is `features/default_spec.yaml`.", walk(FeatureSpec)),
    ]


def all_models() -> list[type[BaseModel]]:
    return [m for _, _, entries in sections() for m in entries]


def description(model: type[BaseModel], name: str) -> str:
    info = model.model_fields[name]
    return (info.description or SUPPLEMENT.get((model.__name__, name), "")).strip()


# ----- rendering --------------------------------------------------------------------------------

def _anchor(model: type[BaseModel]) -> str:
    return model.__name__.lower()


def _num(x: object) -> str:
    if isinstance(x, int) and x > 2**32 and x & (x - 1) == 0:
        return f"2^{x.bit_length() - 1}"
    return str(x)


def _constraints(metadata: list) -> str:
    parts = []
    for m in metadata:
        if isinstance(m, at.Gt):
            parts.append(f"> {_num(m.gt)}")
        elif isinstance(m, at.Ge):
            parts.append(f"≥ {_num(m.ge)}")
        elif isinstance(m, at.Lt):
            parts.append(f"< {_num(m.lt)}")
        elif isinstance(m, at.Le):
            parts.append(f"≤ {_num(m.le)}")
        elif isinstance(m, at.MinLen):
            parts.append(f"at least {m.min_length} long")
        elif isinstance(m, at.MaxLen):
            parts.append(f"at most {m.max_length} long")
    return ", ".join(parts)


def _type(tp: object) -> str:
    if typing.get_origin(tp) is typing.Annotated:
        inner, *extra = typing.get_args(tp)
        meta = [m for x in extra for m in (x.metadata if isinstance(x, FieldInfo) else [x])]
        c = _constraints(meta)
        return _type(inner) + (f" ({c})" if c else "")
    if tp is type(None):
        return "null"
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return f"[{tp.__name__}](#{_anchor(tp)})"
    if isinstance(tp, type):
        return {"str": "string", "int": "integer", "float": "number", "bool": "boolean"}.get(tp.__name__,
                                                                                             tp.__name__)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        return " \\| ".join(f"`{json.dumps(a)}`" for a in args)
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(_type(a) for a in args)
    if origin in (tuple, list):
        if origin is tuple and (len(args) != 2 or args[1] is not Ellipsis):
            return "[" + ", ".join(_type(a) for a in args) + "]"
        return f"list of {_type(args[0])}"
    if origin is dict:
        return f"map of {_type(args[0])} → {_type(args[1])}"
    return str(tp)


def _yaml_value(v: object) -> str:
    if isinstance(v, BaseModel):
        return f"see [{type(v).__name__}](#{_anchor(type(v))})"
    if isinstance(v, tuple):
        v = list(v)
    return f"`{json.dumps(v, ensure_ascii=False)}`"


def _default(info: FieldInfo) -> str:
    if info.default_factory is not None:
        return _yaml_value(info.default_factory())
    if info.default is PydanticUndefined:
        return "**required**"
    return _yaml_value(info.default)


def _text(text: str) -> str:
    """One line; < and > as entities outside code spans (Markdown would read them as HTML tags)."""
    parts = " ".join(text.split()).split("`")
    for i in range(0, len(parts), 2):
        parts[i] = parts[i].replace("<", "&lt;").replace(">", "&gt;")
    return "`".join(parts)


def _cell(text: str) -> str:
    return _text(text).replace("|", "\\|")


def _doc(model: type[BaseModel]) -> str:
    own = model.__dict__.get("__doc__")
    return _text(inspect.cleandoc(own)) if own else ""


def render_model(entry: Entry) -> list[str]:
    model = entry.model
    lines = [f"### {model.__name__}", ""]
    if entry.paths:
        lines += ["Key: " + ", ".join(f"`{p}`" for p in entry.paths), ""]
    doc = _doc(model)
    if doc:
        lines += [doc, ""]
    lines += ["| field | type | default | description |", "|---|---|---|---|"]
    for name, info in model.model_fields.items():
        t = _type(info.annotation)
        c = _constraints(info.metadata)
        if c:
            t += f" ({c})"
        lines.append(f"| `{_key(name, info)}` | {t} | {_default(info)} | {_cell(description(model, name))} |")
    lines.append("")
    return lines


def render() -> str:
    lines = ["# Configuration reference", "",
             f"Generated from the config models by `{COMMAND}`; do not edit by hand. Unknown keys are errors "
             "naming the key path, and a boolean where a number belongs is an error.", ""]
    for title, intro, entries in sections():
        lines += [f"## {title}", "", intro, ""]
        for entry in entries.values():
            lines += render_model(entry)
    return "\n".join(lines).rstrip("\n") + "\n"


def main() -> int:
    sys.stdout.write(render())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
