"""`mtrank daily` as a scheduler runs it, against a real sqlite MLflow store: promotion gate,
idempotent reruns, and two overlapping runs of the same job."""
import json
import subprocess

import pytest
import yaml

from tests.conftest import MTRANK, cli_daily, generate_demo_logs, small_spec, sqlite_client, write_job

pytestmark = pytest.mark.slow   # end to end


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    base = tmp_path_factory.mktemp("daily")
    generate_demo_logs(base / "logs", days=5, rows=30_000, seed=8, users=2000, items=800)
    small_spec(base / "spec.yaml")
    train = {"batch_size": 1024, "epochs": 2, "lr": 0.003}
    write_job(base / "good.yaml", "ranker", train)
    write_job(base / "bad.yaml", "ranker", {**train, "lr": 1e-7, "sparse_lr": 1e-7, "epochs": 1})  # learns nothing
    return base


daily, client = cli_daily, sqlite_client


def test_promotion_gate_and_idempotent_reruns(base):
    r = daily(base, "good.yaml", "2026-11-03")
    assert r.returncode == 0, r.stderr
    assert "v1: champion (first version" in r.stdout
    c = client(base)
    assert str(c.get_model_version_by_alias("ranker", "champion").version) == "1"

    r = daily(base, "good.yaml", "2026-11-03")  # rerun: same version, nothing trained
    assert r.returncode == 0, r.stderr
    assert "reusing ranker v1" in r.stdout
    assert len(c.search_model_versions("name='ranker'")) == 1

    r = daily(base, "bad.yaml", "2026-11-04")  # a model that learned nothing
    assert r.returncode == 0, r.stderr
    v2 = c.get_model_version("ranker", "2")
    assert v2.tags["promotion.decision"] == "rejected" and "worse on" in v2.tags["promotion.reason"]
    assert "ctr" in v2.tags["promotion.reason"]
    assert str(c.get_model_version_by_alias("ranker", "champion").version) == "1"
    assert str(c.get_model_version_by_alias("ranker", "challenger").version) == "2"
    assert c.get_model_version("ranker", "1").tags["promotion.decision"] == "promoted"
    # the challenger's report is re-rendered beside the champion, scored on the gate's rows
    report = base / "work" / "runs" / "ranker" / "2026-11-04" / "report"
    page = (report / "report.html").read_text()
    assert page.count("<section id='gate'>") == 1 and "Promotion gate: not promoted" in page
    assert "<tr class=base><td>champion v1</td>" in page and "<td class=worse>" in page
    saved = json.loads((report / "metrics.json").read_text())
    assert saved["labels"] == ["challenger v2", "champion v1"]
    assert saved["baseline"]["ctr"]["auc"] > saved["tasks"]["ctr"]["auc"]


def test_two_overlapping_dailies_make_one_version(base):
    procs = [subprocess.Popen([*MTRANK, "daily", "--config", base / "good.yaml", "--date", "2026-11-05"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], outs
    loser = next(o for p, o in zip(procs, outs) if p.returncode == 2)
    assert "another 'mtrank daily' for 'ranker' is running" in loser[1]
    c = client(base)
    assert len(c.search_model_versions("name='ranker' and tag.`mtrank.date`='2026-11-05'")) == 1


def test_schedule_files_call_daily_with_an_overlap_guard():
    from pathlib import Path

    d = Path(__file__).parents[1] / "jobs" / "schedule"
    cron = (d / "mtrank-daily.cron").read_text().splitlines()
    line = next(x for x in cron if x and not x.startswith("#"))
    assert len(line.split()[:5]) == 5 and "flock -n" in line and "mtrank daily" in line and "--date" in line
    service = (d / "mtrank-daily.service").read_text()
    assert "Type=oneshot" in service and "flock -n" in service and "mtrank daily" in service
    assert "%%F" in service  # systemd needs % doubled
    assert "OnCalendar=" in (d / "mtrank-daily.timer").read_text()
    job = yaml.safe_load((d / "cronjob.yaml").read_text())
    assert job["kind"] == "CronJob" and job["spec"]["concurrencyPolicy"] == "Forbid"
    args = job["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["args"][0]
    assert "mtrank daily" in args and "--date" in args


def test_evaluate_a_registered_version_by_alias(base, tmp_path):
    uri = f"sqlite:///{(base / 'work' / 'mlflow.db').resolve()}"
    if not (base / "work" / "mlflow.db").exists():
        assert daily(base, "good.yaml", "2026-11-03").returncode == 0
    champion = client(base).get_model_version_by_alias("ranker", "champion")
    r = subprocess.run([*MTRANK, "evaluate", "--model", "models:/ranker@champion", "--tracking-uri", uri,
                        "--data", base / "logs", "--date", champion.tags["mtrank.date"], "--out", tmp_path],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    import json
    m = json.loads((tmp_path / "metrics.json").read_text())["tasks"]
    assert f"{m['ctr']['auc']:.6f}" == champion.tags["auc.ctr"]
