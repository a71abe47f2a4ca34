"""The `mtrank` command: one entry point for every job, each parameterised by date."""
from __future__ import annotations

import argparse
import datetime as dt
import logging
import sys

from features.rules import BadInputError
from features.spec import SpecError, load_spec
from jobs.daily import JobLocked
from pipeline.checkpoint import CheckpointError
from pipeline.trainer import NonFiniteLossError, ResumeMismatchError

log = logging.getLogger("mtrank")


def _date(text: str) -> dt.date:
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date (YYYY-MM-DD): {text!r}") from None


def _cmd_generate(a: argparse.Namespace) -> int:
    from pipeline.synthetic.impressions import ImpressionConfig, generate_impressions

    cfg = ImpressionConfig(seed=a.seed, start=a.start, days=a.days, rows_per_day=a.rows_per_day,
                           n_users=a.users, n_items=a.items, task_correlation=a.task_correlation,
                           popularity_drift=a.popularity_drift)
    s = generate_impressions(a.out, cfg)
    print(f"wrote {s.rows:,} rows in {len(s.files)} files under {s.out_dir} ({s.rows_per_second:,.0f} rows/s)")
    print(f"click {s.click_rate:.2%}  conversion|click {s.cvr_given_click:.2%}  collect {s.collect_rate:.2%}  "
          f"cart {s.cart_rate:.2%}  mean stay|click {s.mean_stay_given_click:.1f}s")
    if a.json:
        from jobs.validate import write_json
        write_json(s.to_dict(), a.json)
    return 0


def _cmd_validate(a: argparse.Namespace) -> int:
    from jobs.validate import format_report, validate, write_json

    spec = load_spec(a.spec)
    if a.on_bad_row:
        spec = spec.model_copy(update={"on_bad_row": a.on_bad_row})
    report = validate(a.data, spec, a.date_from, a.date_to, quarantine_dir=a.quarantine_dir,
                      collisions=not a.no_collisions)
    print(format_report(report))
    if a.json:
        write_json(report, a.json)
    return 0


def _cmd_train(a: argparse.Namespace) -> int:
    from jobs.config import load_config
    from jobs.train import format_metrics, train

    cfg = load_config(a.config, data=a.data, work_dir=a.work_dir)
    out = train(cfg, a.date, resume=a.resume)
    track = None if a.no_track else _track(cfg, out)
    rows = out.summary["rows"]
    last = out.summary["epochs"][-1]
    print(f"trained {rows['trained']:,} rows (read {rows['read']:,}, rejected {rows['rejected']:,}) "
          f"in {out.summary['train_seconds']:.0f}s, {last['samples_per_s']:,.0f} samples/s in the last epoch"
          + (f", resumed from step {out.result.resumed_from_step}" if out.result.resumed_from_step else ""))
    print(format_metrics(out.metrics))
    print(f"run directory: {out.run_dir}  (report: {out.run_dir / 'report' / 'report.html'})")
    if track:
        print(track)
    return 0


def _cmd_promote(a: argparse.Namespace) -> int:
    from jobs.config import load_config
    from jobs.promote import promote

    cfg = load_config(a.config, data=a.data, work_dir=a.work_dir, name=a.name)
    d = promote(cfg, a.date)
    print(f"{cfg.name} v{d.version}: {'PROMOTED to champion' if d.promoted else 'not promoted'} ({d.reason})")
    return 0


def _cmd_daily(a: argparse.Namespace) -> int:
    """train -> evaluate -> promote for one date; rerunning a finished date reuses its version."""
    import json

    from jobs.config import load_config
    from jobs.daily import run_daily
    from jobs.tracking import tracking_uri
    from jobs.train import format_metrics

    cfg = load_config(a.config, data=a.data, work_dir=a.work_dir)
    out = run_daily(cfg, a.date, force=a.force, wait=a.wait)
    print({"reused": f"{a.date}: reusing {cfg.name} v{out.version} (registered by an earlier run; --force retrains)",
           "logged": f"{a.date}: training outcome found in {out.run_dir}; logged it without retraining "
                     f"as {cfg.name} v{out.version} (run {out.run_id})",
           "trained": f"{a.date}: trained and registered {cfg.name} v{out.version} (run {out.run_id})"}[out.how])
    done = out.run_dir / "metrics.json"
    if done.exists():
        print(format_metrics(json.loads(done.read_text())["tasks"]))
        print(f"report: {done.parent / 'report' / 'report.html'}")
    d = out.decision
    print(f"{cfg.name} v{d.version}: {'champion' if d.promoted else 'not promoted'} ({d.reason})")
    uri = tracking_uri(cfg)
    print(f"MLflow store: {uri}\nopen the UI: mlflow ui --backend-store-uri {uri}")
    return 0


def _track(cfg, out) -> str:
    from jobs.tracking import log_training, tracking_uri

    run_id, version = log_training(cfg, out.run_dir)
    uri = tracking_uri(cfg)
    return (f"MLflow run {run_id}; registered {cfg.name} version {version} (alias challenger) in {uri}\n"
            f"open the UI: mlflow ui --backend-store-uri {uri}")


def _cmd_evaluate(a: argparse.Namespace) -> int:
    from jobs.evaluate import evaluate
    from jobs.train import format_metrics

    out = a.out or f".mtrank/reports/{a.date}"
    html, ev, base = evaluate(a.model, a.data, a.date, out, a.baseline, a.max_rows, a.tracking_uri)
    print(format_metrics(ev.metrics))
    if base is not None:
        print("baseline:")
        print(format_metrics(base.metrics))
    print(f"report: {html}  (metrics: {html.with_name('metrics.json')})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mtrank", description="Multi-task ranking training pipeline.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="write synthetic impression logs with hidden ground truth")
    g.add_argument("--out", required=True, help="root directory; writes dt=YYYY-MM-DD/part-*.parquet")
    g.add_argument("--days", type=int, default=7)
    g.add_argument("--rows-per-day", type=int, default=100_000)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--start", type=_date, default=dt.date(2026, 11, 1), help="first day (YYYY-MM-DD)")
    g.add_argument("--users", type=int, default=1_000_000)
    g.add_argument("--items", type=int, default=500_000)
    g.add_argument("--task-correlation", type=float, default=0.8,
                   help="how strongly post-click tasks share the click signal (0..1)")
    g.add_argument("--popularity-drift", type=float, default=0.0,
                   help="fraction of item popularity reshuffled per day")
    g.add_argument("--json", default=None, help="also write the generation summary as JSON here")
    g.set_defaults(func=_cmd_generate)

    v = sub.add_parser("validate", help="check logs against a FeatureSpec; row accounting and collisions")
    v.add_argument("--data", required=True)
    v.add_argument("--spec", default=None, help="FeatureSpec YAML (default: the spec for generated logs)")
    v.add_argument("--from", dest="date_from", type=_date, default=None)
    v.add_argument("--to", dest="date_to", type=_date, default=None)
    v.add_argument("--on-bad-row", choices=["fail", "quarantine"], default=None, help="override the spec")
    v.add_argument("--quarantine-dir", default=".mtrank/quarantine")
    v.add_argument("--json", default=None, help="also write the report as JSON here")
    v.add_argument("--no-collisions", action="store_true", help="skip the per-table collision count")
    v.set_defaults(func=_cmd_validate)

    t = sub.add_parser("train", help="train on the window before --date, evaluate on --date")
    t.add_argument("--config", default=None, help="job YAML (default: the embedded demo job)")
    t.add_argument("--date", type=_date, required=True, help="evaluation day D; trains on the days before it")
    t.add_argument("--resume", action="store_true", help="continue from the run's last intact checkpoint")
    t.add_argument("--data", default=None, help="override the config's data root")
    t.add_argument("--work-dir", default=None, help="override the config's work_dir")
    t.add_argument("--no-track", action="store_true", help="keep the outcome on disk only (no MLflow run)")
    t.set_defaults(func=_cmd_train)

    e = sub.add_parser("evaluate", help="offline report for a saved model on one day")
    e.add_argument("--model", required=True, help="models:/NAME@alias, models:/NAME/VERSION, runs:/ID/model, "
                   "or a saved model directory (a run's model/)")
    e.add_argument("--tracking-uri", default=None, help="MLflow URI for models:/ references "
                   "(default $MLFLOW_TRACKING_URI)")
    e.add_argument("--data", required=True, help="root of the day partitions")
    e.add_argument("--date", type=_date, required=True)
    e.add_argument("--baseline", default=None, help="second model to compare against")
    e.add_argument("--out", default=None, help="report directory (default .mtrank/reports/DATE)")
    e.add_argument("--max-rows", type=int, default=None)
    e.set_defaults(func=_cmd_evaluate)

    pr = sub.add_parser("promote", help="move alias champion to the challenger if it is no worse on --date")
    pr.add_argument("--config", default=None)
    pr.add_argument("--name", default=None, help="registered model name (default: the config's)")
    pr.add_argument("--date", type=_date, required=True, help="held-out day both models are evaluated on")
    pr.add_argument("--data", default=None)
    pr.add_argument("--work-dir", default=None)
    pr.set_defaults(func=_cmd_promote)

    dl = sub.add_parser("daily", help="train -> evaluate -> promote for one date (what a scheduler calls)")
    dl.add_argument("--config", default=None)
    dl.add_argument("--date", type=_date, required=True)
    dl.add_argument("--data", default=None)
    dl.add_argument("--work-dir", default=None)
    dl.add_argument("--force", action="store_true", help="retrain even if this date already has a version")
    dl.add_argument("--wait", action="store_true", help="wait for a running job instead of exiting")
    dl.set_defaults(func=_cmd_daily)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return args.func(args)
    except (BadInputError, SpecError, NonFiniteLossError, ResumeMismatchError, CheckpointError, JobLocked) as e:
        print(f"mtrank {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
