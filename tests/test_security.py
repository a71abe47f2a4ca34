"""What mtrank does not trust: names and paths from configs cannot leave their roots, partitions cannot
point the reader outside the data root, model files are never unpickled, configs are never code, and
the MLflow servers the tests start listen on 127.0.0.1 only."""
import datetime as dt
import re
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from mtrank.features.rules import UNREADABLE, BadInputError
from mtrank.features.spec import SpecError
from mtrank.jobs.config import load_config, parse_config
from mtrank.pipeline.checkpoint import CheckpointError
from mtrank.pipeline.dataset import list_partitions, open_window
from tests.conftest import make_frame, mtrank_in_process

REPO = Path(__file__).parents[1]
SOURCES = [p for d in ("features", "models", "pipeline", "jobs", "bench") for p in (REPO / d).rglob("*.py")]


@pytest.mark.parametrize("name", ["../escape", "a/b", "/abs", ".hidden", "..", "a..b", "x\\y", "a b", "n'; drop",
                                  "", "x" * 129])
def test_job_name_must_be_a_plain_file_name(name):
    with pytest.raises(SpecError, match=r"invalid job config: name:"):
        parse_config({"name": name, "data": "logs"}, "job.yaml")


@pytest.mark.parametrize("name", ["ranker", "mtrank-demo", "Ranker_2.v1", "7days"])
def test_plain_job_names_pass(name):
    assert parse_config({"name": name, "data": "logs"}, "job.yaml").name == name


def test_a_job_name_escaping_work_dir_creates_nothing(tmp_path):
    (tmp_path / "job.yaml").write_text(yaml.safe_dump({"name": "../../outside", "data": "logs", "work_dir": "work"}))
    r = mtrank_in_process("daily", "--config", tmp_path / "job.yaml", "--date", "2026-11-03")
    assert r.returncode == 2 and "name:" in r.stderr and "not a plain name" in r.stderr, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job.yaml"]  # no work dir, lock or run dir anywhere
    with pytest.raises(SpecError, match="not a plain name"):  # the CLI's --name override goes through the same check
        load_config(tmp_path / "job.yaml", name="x/../../y")


@pytest.fixture
def root(tmp_path, spec):
    data = tmp_path / "logs"
    (data / "dt=2026-11-01").mkdir(parents=True)
    make_frame(spec, 20).write_parquet(data / "dt=2026-11-01" / "part-0.parquet")
    return data


def test_partition_discovery_ignores_names_that_are_not_days(root, spec):
    for odd in ("dt=..", "dt=2026-11-02.bak", "x-dt=2026-11-02", "dt=2026-11-02 ", "dt=2026-11-2", "dt=2026-1102",
                "2026-11-02x", "dt=202611020"):
        (root / odd).mkdir()
        make_frame(spec, 5).write_parquet(root / odd / "part-0.parquet")
    assert list(list_partitions(root)) == [dt.date(2026, 11, 1)]
    assert open_window(root, spec).rows == 20


def test_a_partition_or_file_resolving_outside_the_root_is_refused(root, spec, tmp_path):
    outside = tmp_path / "elsewhere"
    (outside / "day").mkdir(parents=True)
    make_frame(spec, 5).write_parquet(outside / "day" / "secret.parquet")
    (root / "dt=2026-11-02").symlink_to(outside / "day", target_is_directory=True)
    with pytest.raises(BadInputError, match="partition resolves outside the data root") as e:
        list_partitions(root)
    assert e.value.rule == UNREADABLE and "dt=2026-11-02" in e.value.file
    (root / "dt=2026-11-02").unlink()
    (root / "dt=2026-11-01" / "part-1.parquet").symlink_to(outside / "day" / "secret.parquet")
    with pytest.raises(BadInputError, match="file resolves outside the data root"):
        open_window(root, spec)


def call_text(text: str, start: int) -> str:
    """The call starting at `start` up to its balanced closing parenthesis."""
    depth = 0
    for i in range(text.index("(", start), len(text)):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        if depth == 0:
            return text[start:i + 1]
    return text[start:]


def test_every_torch_load_is_weights_only():
    calls = [(p, call_text(t, m.start())) for p in SOURCES for t in [p.read_text()]
             for m in re.finditer(r"torch\.load\(", t)]
    assert calls, "no torch.load found: the scan is broken"
    unsafe = [f"{p.relative_to(REPO)}: {c}" for p, c in calls if "weights_only=True" not in c]
    assert not unsafe, unsafe


class Payload:
    """Unpickling this runs code (touches a file): what a hostile weights.pt would carry."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_model_file_carrying_code_is_refused_not_run(tmp_path, spec):
    from mtrank.features.numeric import NumericStats
    from mtrank.jobs.model_io import load_model, save_model
    from mtrank.models import ModelConfig
    from mtrank.pipeline.trainer import build_model

    model = build_model(spec, ModelConfig(experts=2, expert_mlp=[8], tower_mlp=[4]), 0, None)
    save_model(tmp_path / "model", model, spec, NumericStats())
    marker = tmp_path / "pwned"
    torch.save({"weights": Payload(marker)}, tmp_path / "model" / "weights.pt")
    with pytest.raises(CheckpointError, match="weights.pt: refused to load: it holds pickled Python objects"):
        load_model(tmp_path / "model")
    assert not marker.exists()
    # the same through the CLI: one line, exit 2, no traceback
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "mtrank.jobs.cli", "evaluate", "--model", str(tmp_path / "model"),
                        "--data", str(tmp_path), "--date", "2026-11-01", "--out", str(tmp_path / "report")],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "refused to load" in r.stderr and not marker.exists()


def test_configs_are_data_never_code(tmp_path):
    offenders = [f"{p.relative_to(REPO)}" for p in SOURCES
                 if re.search(r"yaml\.(load|unsafe_load|full_load)\(|Loader\s*=", p.read_text())]
    assert not offenders, offenders
    marker = tmp_path / "pwned"
    (tmp_path / "job.yaml").write_text(f"name: !!python/object/apply:pathlib.Path.touch [{marker}]\ndata: logs\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_config(tmp_path / "job.yaml")
    assert not marker.exists()


def test_mlflow_servers_started_by_tests_listen_on_loopback_only():
    starters = [p for p in (REPO / "tests").glob("*.py") if re.search(r'"server",\s*"--host"', p.read_text())]
    assert starters, "no test starts an mlflow server: the scan is broken"
    for p in starters:
        text = p.read_text()
        assert re.findall(r'"--host",\s*"([^"]+)"', text) and set(re.findall(r'"--host",\s*"([^"]+)"', text)) == {
            "127.0.0.1"}, p.name
        assert "0.0.0.0" not in text, p.name
