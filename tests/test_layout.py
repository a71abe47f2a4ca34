"""The architecture as a test: one direction of data flow, no import cycles, one error base.

features <- models <- pipeline <- jobs: a room imports only rooms to its left (every import, at
module level or inside a function, read from the source), and the modules of `jobs` import each
other without a cycle.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
ROOMS = ("features", "models", "pipeline", "jobs")


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def _modules(room: str) -> dict[str, Path]:
    return {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
            for p in (ROOT / room).rglob("*.py")}


@pytest.mark.parametrize("room", ROOMS)
def test_rooms_import_only_rooms_to_their_left(room):
    allowed = set(ROOMS[:ROOMS.index(room) + 1])
    bad = [f"{mod} imports {imp}" for mod, path in _modules(room).items() for imp in _imports(path)
           if imp.split(".")[0] in ROOMS and imp.split(".")[0] not in allowed]
    assert not bad, "\n".join(bad)


def test_models_know_no_parquet_or_mlflow_and_features_no_torch():
    for room, banned in (("models", {"pyarrow", "polars", "mlflow"}), ("features", {"torch", "mlflow"})):
        for mod, path in _modules(room).items():
            assert not {i.split(".")[0] for i in _imports(path)} & banned, mod


def test_jobs_modules_import_each_other_without_a_cycle():
    mods = _modules("jobs")
    graph = {m: {i for i in _imports(p) if i in mods and i != m} for m, p in mods.items()}
    graph = {m: deps - {"jobs.cli"} if m != "jobs.cli" else deps for m, deps in graph.items()}
    state: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for d in graph[m]:
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*stack, m, d]))
            if d not in state:
                visit(d, [*stack, m])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [])
    assert not any("jobs.cli" in deps for m, deps in
                   {m: {i for i in _imports(p)} for m, p in mods.items() if m != "jobs.cli"}.items())


def test_every_user_facing_error_shares_one_base():
    from features.base import MtrankError
    from features.rules import BadInputError
    from features.spec import SpecError
    from jobs.daily import JobLocked, TrainingFailed
    from jobs.tracking import TrackingUnavailable
    from pipeline.checkpoint import CheckpointError, OutputError
    from pipeline.scoring import ScoringError
    from pipeline.trainer import NonFiniteLossError, ResumeMismatchError

    for cls in (BadInputError, SpecError, JobLocked, TrainingFailed, TrackingUnavailable, CheckpointError,
                OutputError, ScoringError, NonFiniteLossError, ResumeMismatchError):
        assert issubclass(cls, MtrankError), cls


def test_every_config_model_derives_from_the_strict_base():
    import pydantic

    from features.base import StrictConfig

    for room in ROOMS:
        for mod, path in _modules(room).items():
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ClassDef):
                    bases = {ast.unparse(b) for b in node.bases}
                    assert not bases & {"BaseModel", "pydantic.BaseModel"} or node.name == "StrictConfig", \
                        f"{mod}.{node.name} derives from pydantic.BaseModel, not features.base.StrictConfig"
    assert issubclass(StrictConfig, pydantic.BaseModel)
