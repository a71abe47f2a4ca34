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
    return {"mtrank." + ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
            for p in (ROOT / room).rglob("*.py")}


def _room(module: str) -> str | None:
    """The room an import names (`mtrank.pipeline.reader` -> pipeline), or None for other packages."""
    parts = module.split(".")
    return parts[1] if parts[0] == "mtrank" and len(parts) > 1 and parts[1] in ROOMS else None


@pytest.mark.parametrize("room", ROOMS)
def test_rooms_import_only_rooms_to_their_left(room):
    allowed = set(ROOMS[:ROOMS.index(room) + 1])
    bad = [f"{mod} imports {imp}" for mod, path in _modules(room).items() for imp in _imports(path)
           if _room(imp) is not None and _room(imp) not in allowed]
    assert not bad, "\n".join(bad)


def test_models_know_no_parquet_or_mlflow_and_features_no_torch():
    for room, banned in (("models", {"pyarrow", "polars", "mlflow"}), ("features", {"torch", "mlflow"})):
        for mod, path in _modules(room).items():
            assert not {i.split(".")[0] for i in _imports(path)} & banned, mod


def test_jobs_modules_import_each_other_without_a_cycle():
    mods = _modules("jobs")
    graph = {m: {i for i in _imports(p) if i in mods and i != m} for m, p in mods.items()}
    graph = {m: deps - {"mtrank.jobs.cli"} if m != "mtrank.jobs.cli" else deps for m, deps in graph.items()}
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
    assert not any("mtrank.jobs.cli" in deps for m, deps in
                   {m: {i for i in _imports(p)} for m, p in mods.items() if m != "mtrank.jobs.cli"}.items())


def test_every_user_facing_error_shares_one_base():
    from mtrank.features.base import MtrankError
    from mtrank.features.rules import BadInputError
    from mtrank.features.spec import SpecError
    from mtrank.jobs.daily import JobLocked, TrainingFailed
    from mtrank.jobs.tracking import TrackingUnavailable
    from mtrank.pipeline.checkpoint import CheckpointError
    from mtrank.pipeline.output_files import OutputError
    from mtrank.pipeline.scoring import ScoringError
    from mtrank.pipeline.trainer import NonFiniteLossError, ResumeMismatchError

    for cls in (BadInputError, SpecError, JobLocked, TrainingFailed, TrackingUnavailable, CheckpointError,
                OutputError, ScoringError, NonFiniteLossError, ResumeMismatchError):
        assert issubclass(cls, MtrankError), cls


def test_every_config_model_derives_from_the_strict_base():
    import pydantic

    from mtrank.features.base import StrictConfig

    for room in ROOMS:
        for mod, path in _modules(room).items():
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ClassDef):
                    bases = {ast.unparse(b) for b in node.bases}
                    assert not bases & {"BaseModel", "pydantic.BaseModel"} or node.name == "StrictConfig", \
                        f"{mod}.{node.name} derives from pydantic.BaseModel, not features.base.StrictConfig"
    assert issubclass(StrictConfig, pydantic.BaseModel)


def test_nothing_imports_a_bare_room_name():
    """The rooms are importable only as `mtrank.<room>`: a bare `from features...` works in the
    checkout by accident (cwd on sys.path) and nowhere else."""
    bad = []
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT).parts
        if rel[0] in ("build", "data") or any(p.startswith(".") or p.startswith("venv") for p in rel[:-1]):
            continue   # virtualenvs, caches, work dirs: not this repository's code
        bad += [f"{path.relative_to(ROOT)} imports {imp}" for imp in _imports(path) if imp.split(".")[0] in ROOMS]
    assert not bad, "\n".join(bad)


@pytest.mark.slow
def test_the_wheel_installs_one_top_level_name(tmp_path):
    import subprocess
    import sys
    import zipfile

    import shutil

    src = tmp_path / "src"   # a copy: setuptools builds in-tree (build/), which must not land in the checkout
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".venv", ".git", "build", "*.egg-info", ".mtrank",
                                                             "__pycache__", "results", ".venv-peers"))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(src)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = tmp_path.glob("mtrank-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"mtrank"}, tops
    for room in ROOMS:
        assert f"mtrank/{room}/__init__.py" in names
    assert "mtrank/features/default_spec.yaml" in names and "mtrank/jobs/default_job.yaml" in names
    assert "mtrank/__init__.py" not in names   # a namespace: the rooms' own __init__ files are the package roots


def test_data_only_commands_do_not_import_torch():
    """`validate`, `exposures` and `report` read Parquet and write files: no model, so no torch (its
    import is seconds of CPU on a small scheduler box)."""
    import subprocess
    import sys

    code = ("import sys, mtrank.jobs.validate, mtrank.jobs.exposures, mtrank.jobs.report; "
            "print(sorted(m for m in ('torch', 'mlflow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"
