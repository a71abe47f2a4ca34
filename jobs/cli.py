"""The `mtrank` command: one entry point for every job, each parameterised by date."""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import logging
import sys

from mtrank.features.base import MtrankError
from mtrank.features.spec import SpecError, load_spec
from mtrank.pipeline.ranks import PeerFailed

log = logging.getLogger("mtrank")


def _date(text: str) -> dt.date:
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date (YYYY-MM-DD): {text!r}") from None


def _cmd_generate(a: argparse.Namespace) -> int:
    from mtrank.pipeline.synthetic.impressions import ImpressionConfig, generate_impressions

    cfg = ImpressionConfig(seed=a.seed, start=a.start, days=a.days, rows_per_day=a.rows_per_day,
                           n_users=a.users, n_items=a.items, task_correlation=a.task_correlation,
                           popularity_drift=a.popularity_drift, row_group_size=a.row_group_size)
    if a.candidates:
        return _generate_candidates(a, cfg)
    s = generate_impressions(a.out, cfg)
    print(f"wrote {s.rows:,} rows in {len(s.files)} files under {s.out_dir} ({s.rows_per_second:,.0f} rows/s)")
    print(f"click {s.click_rate:.2%}  conversion|click {s.cvr_given_click:.2%}  collect {s.collect_rate:.2%}  "
          f"cart {s.cart_rate:.2%}  mean stay|click {s.mean_stay_given_click:.1f}s")
    if a.json:
        from mtrank.jobs.validate import write_json
        write_json(s.to_dict(), a.json)
    return 0


def _generate_candidates(a: argparse.Namespace, cfg) -> int:
    from mtrank.pipeline.synthetic.candidates import generate_candidates

    if a.date is None:
        print("mtrank generate: error: --candidates requires --date", file=sys.stderr)
        return 2
    s = generate_candidates(a.out, cfg, a.date, a.requests, a.per_request)
    print(f"wrote {s.rows:,} candidates for {s.requests:,} requests of {s.day} in {len(s.files)} files "
          f"under {s.out_dir} ({s.rows_per_second:,.0f} rows/s)")
    if a.json:
        from mtrank.jobs.validate import write_json
        write_json(s.to_dict(), a.json)
    return 0


def _cmd_exposures(a: argparse.Namespace) -> int:
    from mtrank.jobs.config import load_config
    from mtrank.jobs.exposures import count_exposures

    cfg = load_config(a.config, data=a.data)
    item_column = a.item_column or cfg.score.item_column
    if a.spec:
        spec = load_spec(a.spec)
        if item_column not in {f.name for f in spec.categorical}:
            raise SpecError(f"{a.spec}: item column {item_column!r} is not a categorical feature of the spec")
    s = count_exposures(cfg.data, a.date, a.out, item_column=item_column)
    print(f"wrote exposures of {s.items:,} items ({s.rows:,} exposures) on {s.day} to {s.path}")
    return 0


def _cmd_partition(a: argparse.Namespace) -> int:
    from mtrank.jobs.partition import partition

    print(partition(a.data, a.time_column, a.out, timezone=a.timezone, unit=a.unit).line())
    return 0


def _cmd_validate(a: argparse.Namespace) -> int:
    from mtrank.jobs.validate import format_report, validate, write_json

    spec = load_spec(a.spec)
    if a.on_bad_row:
        spec = spec.model_copy(update={"on_bad_row": a.on_bad_row})
    report = validate(a.data, spec, a.date_from, a.date_to, quarantine_dir=a.quarantine_dir,
                      collisions=not a.no_collisions, on_unreadable=a.on_unreadable_file)
    print(format_report(report))
    if a.json:
        write_json(report, a.json)
    return 0


def _cmd_train(a: argparse.Namespace) -> int:
    from mtrank.pipeline.ranks import under_torchrun

    from mtrank.jobs.config import load_config
    if a.nproc > 1 and not under_torchrun():   # this process only launches the ranks
        from mtrank.jobs.launch import torchrun
        load_config(a.config, data=a.data, work_dir=a.work_dir).train.check_ranks(a.nproc)  # once, before any rank
        return torchrun(a.nproc, a.argv)
    from mtrank.jobs.train import format_metrics, train
    from mtrank.pipeline.distributed import process_group
    cfg = load_config(a.config, data=a.data, work_dir=a.work_dir)
    parent = None
    if a.parent:
        from mtrank.jobs.daily import load_parent
        parent = load_parent(a.parent)
    from mtrank.jobs.daily import daily_remedy
    with process_group() as dist, daily_remedy() if a.for_daily else contextlib.nullcontext():
        out = train(cfg, a.date, resume=a.resume, dist=dist, parent=parent,
                    track=a.for_daily or not a.no_track)   # daily's ranks: rank 0 opens the live run
    if not out.written or a.for_daily:   # rank 0 writes, tracks and reports the job (or daily does)
        return 0
    track = None if a.no_track else _track(cfg, out)
    rows = out.summary["rows"]
    last = out.summary["epochs"][-1]
    aside = "".join(f", {k.replace('_', ' ')} {rows[k]:,}" for k in ("sampled_out", "held_out") if rows.get(k))
    print(f"trained {rows['trained']:,} rows (read {rows['read']:,}, rejected {rows['rejected']:,}{aside}) "
          f"in {out.summary['train_seconds']:.0f}s, {last['samples_per_s']:,.0f} samples/s in the last epoch"
          + (f", resumed from step {out.result.resumed_from_step}" if out.result.resumed_from_step else ""))
    for u in rows.get("unreadable", []):
        print(f"SKIPPED unreadable file {u['file']}" + (f" row group {u['row_group']}" if u["row_group"] is not None
                                                        else "") + f": {u['error']}")
    print(format_metrics(out.metrics))
    print(f"run directory: {out.run_dir}  (report: {out.run_dir / 'report' / 'report.html'})")
    if track:
        print(track)
    return 0


def _cmd_promote(a: argparse.Namespace) -> int:
    from mtrank.jobs.config import load_config
    from mtrank.jobs.promote import promote
    from mtrank.jobs.tracking import require_store, tracking_uri

    cfg = load_config(a.config, data=a.data, work_dir=a.work_dir, name=a.name)
    if a.tracking_uri:
        cfg = cfg.model_copy(update={"tracking_uri": a.tracking_uri})
    require_store(tracking_uri(cfg), "mtrank promote")
    d = promote(cfg, a.date)
    if d.decided_before:   # say so: "PROMOTED" would read as a gate run on --date just now
        print(f"{cfg.name} v{d.version} (challenger): decided before, {'promoted' if d.promoted else 'not promoted'} "
              f"({d.reason}); nothing evaluated on {a.date}: the gate runs once per challenger")
    else:
        print(f"{cfg.name} v{d.version}: {'PROMOTED to champion' if d.promoted else 'not promoted'} ({d.reason})")
    return 0


def _cmd_daily(a: argparse.Namespace) -> int:
    """train -> evaluate -> promote for one date; rerunning a finished date reuses its version."""
    import json

    from mtrank.jobs.config import load_config
    from mtrank.jobs.daily import run_daily
    from mtrank.jobs.tracking import tracking_uri
    from mtrank.jobs.train import format_metrics

    cfg = load_config(a.config, data=a.data, work_dir=a.work_dir)
    out = run_daily(cfg, a.date, force=a.force, wait=a.wait, full=a.full, nproc=a.nproc)
    print({"reused": f"{a.date}: reusing {cfg.name} v{out.version} (registered by an earlier run; --force retrains)",
           "logged": f"{a.date}: training outcome found in {out.run_dir}; logged it without retraining "
                     f"as {cfg.name} v{out.version} (run {out.run_id})",
           "trained": f"{a.date}: trained and registered {cfg.name} v{out.version} (run {out.run_id})",
           "lost": f"{a.date}: another run registered {cfg.name} v{out.version} for this date first; this run's "
                   f"version was removed (run {out.run_id} is tagged mtrank.superseded_by_version) and the "
                   "winner's run decides the promotion"}[out.how])
    done = out.run_dir / "metrics.json"
    if done.exists():
        outcome = json.loads(done.read_text())
        lin = outcome.get("lineage") or {}
        w = outcome["train_window"]
        print(f"training: {'warm start from v' + str(lin['parent_version']) + ' (' + str(lin.get('source')) + ')' if lin.get('parent_version') else 'from scratch'}"
              f" on {w['start']}..{w['end']}, {outcome['train_seconds']:.0f}s")
        print(format_metrics(outcome["tasks"]))
        print(f"report: {done.parent / 'report' / 'report.html'}")
    d = out.decision
    if d is not None:
        print(f"{cfg.name} v{d.version}: {'champion' if d.promoted else 'not promoted'} ({d.reason})")
    uri = tracking_uri(cfg)
    print(f"MLflow store: {uri}\n{_ui_hint(uri)}")
    return 0


def _ui_hint(uri: str) -> str:
    """A server is its own UI; a local store (sqlite, PostgreSQL) is opened with `mlflow ui`."""
    if uri.startswith(("http://", "https://")):
        return f"open the UI: {uri}"
    return f"open the UI: mlflow ui --backend-store-uri {uri}"


def _cmd_lineage(a: argparse.Namespace) -> int:
    from mtrank.jobs.config import load_config
    from mtrank.jobs.tracking import lineage, require_store, tracking_uri

    cfg = load_config(a.config, name=a.name, work_dir=a.work_dir, data=".")
    if a.tracking_uri:
        cfg = cfg.model_copy(update={"tracking_uri": a.tracking_uri})
    require_store(tracking_uri(cfg), "mtrank lineage")
    chain = lineage(cfg, a.version)
    print(f"{cfg.name}: {len(chain)} version(s) from {a.version} back to "
          + ("its full retrain" if chain[-1].tags.get("mtrank.train_mode", "full") == "full" else "the oldest one left"))
    for v in chain:
        t = v.tags
        how = (f"warm start from v{t['mtrank.parent_version']}" if t.get("mtrank.parent_version")
               else "full retrain")
        aliases = f" [{', '.join(v.aliases)}]" if getattr(v, "aliases", None) else ""
        print(f"  v{v.version}{aliases}  date {t.get('mtrank.date', '?')}  window {t.get('mtrank.window', '?')}  "
              f"{how}  depth {t.get('mtrank.depth', '0')}  root v{t.get('mtrank.root_version', v.version)}  "
              f"{t.get('promotion.decision', 'undecided')}")
    return 0


def _track(cfg, out) -> str:
    from mtrank.jobs.tracking import log_training, tracking_uri

    reg = log_training(cfg, out.run_dir, command="train")
    run_id, version = reg.run_id, reg.version
    uri = tracking_uri(cfg)
    return (f"MLflow run {run_id}; registered {cfg.name} version {version} (alias challenger) in {uri}\n"
            f"{_ui_hint(uri)}")


def _cmd_score(a: argparse.Namespace) -> int:
    from mtrank.jobs.config import load_config
    from mtrank.jobs.score import format_lists, score
    from mtrank.jobs.tracking import require_store, tracking_uri

    cfg = load_config(a.config, work_dir=a.work_dir, data=a.data or ".")
    if a.tracking_uri:
        cfg = cfg.model_copy(update={"tracking_uri": a.tracking_uri})
    if not a.no_track:
        require_store(tracking_uri(cfg), "mtrank score (it logs a run; --no-track does not)")
    res = score(cfg, a.model, a.candidates, a.date, a.out, exposures=a.exposures, track=not a.no_track)
    s = res.summary
    rules = ", ".join(f"{k} {v:,}" for k, v in s["rules"].items() if v)
    print(f"scored {s['rows_in']:,} candidates of {s['requests']:,} requests (read {s['rows_read']:,}, "
          f"rejected {s['rows_rejected']:,}); {s['rows_shown']:,} shown, {s['requests_short']:,} requests short "
          f"of the list size; model {a.model}" + (f" (v{s['model_version']})" if s["model_version"] else ""))
    print(f"score = {s['formula']}")
    print(f"rules: {rules or 'none applied'}; caps resolved in {s['cap_rounds']} round(s)")
    missing = {k: v for k, v in s["missing_values"].items() if v}
    if missing:
        print("missing values (neither boosted nor demoted; a request without time is served last): "
              + ", ".join(f"{k} {v:,}" for k, v in missing.items()))
    print(f"{s['seconds']['total_s']:.1f}s: " + ", ".join(f"{k.removesuffix('_s')} {v:.2f}s" for k, v in
                                                          s["seconds"].items() if k != "total_s"))
    if a.show:
        print(format_lists(res.table, requests=a.show, request_column=res.request_column,
                           item_column=cfg.score.item_column, terms=res.factor_terms))
    print(f"ranked lists: {res.out}" + (f"  (MLflow run {res.run_id})" if res.run_id else ""))
    return 0


def _cmd_tune_fusion(a: argparse.Namespace) -> int:
    from mtrank.jobs.config import load_config
    from mtrank.jobs.tracking import require_store, tracking_uri
    from mtrank.jobs.tune_fusion import format_result, tune_fusion

    cfg = load_config(a.config, data=a.data, work_dir=a.work_dir)
    if a.tracking_uri:
        cfg = cfg.model_copy(update={"tracking_uri": a.tracking_uri})
    if not a.no_track:
        require_store(tracking_uri(cfg), "mtrank tune-fusion (it logs a run; --no-track does not)")
    out = tune_fusion(cfg, a.model, cfg.data, a.date, k=a.k, trials=a.trials, objective=a.objective,
                      max_rows=a.max_rows, seed=a.seed, json_path=a.json, track=not a.no_track)
    print(format_result(out.result))
    if out.json_path:
        print(f"every trial: {out.json_path}")
    if out.run_id:
        print(f"MLflow run {out.run_id} (experiment {cfg.name})")
    return 0


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"not a positive integer: {text!r}")
    return n


def _cmd_evaluate(a: argparse.Namespace) -> int:
    from pathlib import Path

    from mtrank.jobs.config import load_config
    from mtrank.jobs.evaluate import evaluate
    from mtrank.jobs.paths import quarantine_dir
    from mtrank.jobs.tracking import require_store, tracking_uri
    from mtrank.jobs.train import format_metrics

    cfg = load_config(a.config, work_dir=a.work_dir, data=a.data)
    if a.tracking_uri:
        cfg = cfg.model_copy(update={"tracking_uri": a.tracking_uri})
    uri = tracking_uri(cfg) if any(":/" in str(m) for m in (a.model, a.baseline) if m) else None
    if uri:   # before the report folder is made: a command that cannot run leaves nothing behind
        require_store(uri, a.model)
    out = a.out or Path(cfg.work_dir) / "reports" / str(a.date)
    html, ev, base = evaluate(a.model, cfg.data, a.date, out, a.baseline, a.max_rows, uri,
                              quarantine_dir=a.quarantine_dir or quarantine_dir(cfg, "evaluate"))
    print(format_metrics(ev.metrics))
    if ev.as_served:
        from mtrank.jobs.evaluate import format_as_served

        print(format_as_served(ev.as_served))
    if base is not None:
        print("baseline:")
        print(format_metrics(base.metrics))
    print(f"report: {html}  (metrics: {html.with_name('metrics.json')})")
    return 0


def _cmd_init_spec(a: argparse.Namespace) -> int:
    """Propose a commented FeatureSpec YAML from Parquet logs (stdout, or --out)."""
    from mtrank.features.infer_spec import InferOptions, infer_spec, write_spec

    def pairs(items: list[str] | None, flag: str) -> list[tuple[str, str]]:
        out = []
        for item in items or []:
            left, sep, right = item.partition("=")
            if not sep or not left or not right:
                raise SpecError(f"{flag} {item!r}: expected {flag} NAME=VALUE")
            out.append((left, right))
        return out

    from mtrank.features.spec import task_name_for

    tasks = [(task_name_for(c), c) if kind == "label" else pairs([c], "--task")[0] for kind, c in a.labels or []]
    if a.out and not a.force:
        from pathlib import Path
        if Path(a.out).exists():
            raise SpecError(f"{a.out}: file exists (pass --force to overwrite)")
    opt = InferOptions(tasks=tasks, parents=dict(pairs(a.parent, "--parent")), exclude=a.exclude or [],
                       categorical=a.categorical or [], numeric=a.numeric or [], group_key=a.group_key,
                       request_id=a.request_id, timestamp=a.timestamp, collision_target=a.collision_target,
                       hash_seed=a.hash_seed, max_rows=a.max_rows, max_buckets=a.max_buckets)
    res = infer_spec(a.data, opt)
    if a.out is None:
        sys.stdout.write(res.text)
        return 0
    write_spec(res.text, a.out, force=a.force)
    print(f"wrote {a.out}: {res.features} features, {res.tasks} task(s), inferred from {res.rows_sampled:,} of "
          f"{res.rows_total:,} rows in {res.files} files; review it, then: mtrank validate --data {a.data} "
          f"--spec {a.out}")
    return 0


class _HelpFormatter(argparse.HelpFormatter):
    """Every flag's help ends with its default, unless the default is nothing (None, off)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "%(default)" in text or "default" in text.lower() or action.default in (None, False, argparse.SUPPRESS) \
                or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    import functools
    from importlib.metadata import PackageNotFoundError, version

    try:
        release = version("mtrank")
    except PackageNotFoundError:   # a checkout that was never installed
        release = "unknown"
    # allow_abbrev=False: `--conf` is an error, not a silent `--config`
    p = argparse.ArgumentParser(prog="mtrank", description="Multi-task ranking training pipeline.",
                                allow_abbrev=False, formatter_class=_HelpFormatter)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("--version", action="version", version=f"mtrank {release}")
    sub = p.add_subparsers(dest="command", required=True,
                           parser_class=functools.partial(argparse.ArgumentParser, allow_abbrev=False,
                                                          formatter_class=_HelpFormatter))

    g = sub.add_parser("generate", help="write synthetic impression logs with hidden ground truth")
    g.add_argument("--out", required=True, help="root directory; writes dt=YYYY-MM-DD/part-*.parquet")
    g.add_argument("--days", type=_positive, default=7, help="day partitions to write")
    g.add_argument("--rows-per-day", type=_positive, default=100_000, help="impressions per day")
    g.add_argument("--seed", type=int, default=0, help="the same seed writes the same logs")
    g.add_argument("--start", type=_date, default=dt.date(2026, 11, 1), help="first day (YYYY-MM-DD)")
    g.add_argument("--users", type=_positive, default=1_000_000, help="size of the user universe (Zipf)")
    g.add_argument("--items", type=_positive, default=500_000, help="size of the item universe (Zipf)")
    g.add_argument("--task-correlation", type=float, default=0.8,
                   help="how strongly post-click tasks share the click signal (0..1)")
    g.add_argument("--popularity-drift", type=float, default=0.0,
                   help="fraction of item popularity reshuffled per day")
    g.add_argument("--row-group-size", type=_positive, default=65_536,
                   help="rows per Parquet row group: the unit data-parallel ranks split a window by")
    g.add_argument("--json", default=None, help="also write the generation summary as JSON here")
    g.add_argument("--candidates", action="store_true",
                   help="write one candidate day for scoring (no labels) instead of impression logs")
    g.add_argument("--date", type=_date, default=None, help="day of the candidates (required with --candidates)")
    g.add_argument("--requests", type=int, default=10_000, help="candidate requests (with --candidates)")
    g.add_argument("--per-request", type=int, default=100, help="candidates per request (with --candidates)")
    g.set_defaults(func=_cmd_generate)

    pa_ = sub.add_parser("partition", help="lay out a flat export (a Parquet file or folder) as day folders "
                         "by its time column")
    pa_.add_argument("--data", required=True, help="a .parquet file, or a folder of them (local or s3://)")
    pa_.add_argument("--time-column", required=True, help="timestamp, date or integer epoch column giving each "
                     "row's day")
    pa_.add_argument("--out", required=True, help="root to write OUT/dt=YYYY-MM-DD/part-00000.parquet under "
                     "(days already there are refused)")
    pa_.add_argument("--timezone", default=None, help="the day in this IANA time zone (e.g. Asia/Shanghai; "
                     "naive times are taken as UTC); default: the column's own")
    pa_.add_argument("--unit", default=None, choices=("s", "ms", "us", "ns"), help="epoch unit of an integer "
                     "time column")
    pa_.set_defaults(func=_cmd_partition)

    x = sub.add_parser("exposures", help="count each item's exposures on one day of the logs (traffic caps)")
    x.add_argument("--config", default=None, help="job YAML: its data and score.item_column are the defaults "
                   "(default: the embedded demo job)")
    x.add_argument("--data", default=None, help="root of the day partitions (default: the config's data)")
    x.add_argument("--date", type=_date, required=True, help="the day D; reads DATA/dt=D/ (or the root's own day folders)")
    x.add_argument("--out", required=True, help="output Parquet file: the item column, dt, exposures")
    x.add_argument("--item-column", default=None, help="item id column of the logs (default: the config's "
                   "score.item_column)")
    x.add_argument("--spec", default=None, help="FeatureSpec YAML; if given, the item column must be one of "
                   "its categorical features")
    x.set_defaults(func=_cmd_exposures)

    v = sub.add_parser("validate", help="check logs against a FeatureSpec; row accounting and collisions")
    v.add_argument("--data", required=True, help="root of the day partitions (DIR/dt=YYYY-MM-DD/*.parquet, "
                   "or ds=YYYYMMDD/ and the like)")
    v.add_argument("--spec", default=None, help="FeatureSpec YAML (default: the spec for generated logs)")
    v.add_argument("--from", dest="date_from", type=_date, default=None, help="first day (default: the first found)")
    v.add_argument("--to", dest="date_to", type=_date, default=None, help="last day (default: the last found)")
    v.add_argument("--on-bad-row", choices=["fail", "quarantine"], default=None, help="override the spec")
    v.add_argument("--quarantine-dir", default=".mtrank/quarantine", help="where quarantined rows go (only with "
                   "on_bad_row: quarantine)")
    v.add_argument("--on-unreadable-file", choices=["fail", "skip"], default="fail",
                   help="a corrupt or truncated Parquet file: fail naming it, or skip it (listed in the report)")
    v.add_argument("--json", default=None, help="also write the report as JSON here")
    v.add_argument("--no-collisions", action="store_true", help="skip the per-table collision count")
    v.set_defaults(func=_cmd_validate)

    isp = sub.add_parser("init-spec", help="propose a commented FeatureSpec YAML from Parquet logs")
    isp.add_argument("--data", required=True, help="DIR/dt=YYYY-MM-DD/*.parquet (or ds=YYYYMMDD/ and the like), a "
                     "folder of .parquet files, or one .parquet file")
    isp.add_argument("--label", dest="labels", action="append", type=lambda c: ("label", c), metavar="COL",
                     help="label column; its task is named after it (repeat for more tasks)")
    isp.add_argument("--task", dest="labels", action="append", type=lambda c: ("task", c), metavar="NAME=COL",
                     help="label column COL as task NAME")
    isp.add_argument("--parent", action="append", metavar="CHILD=PARENT",
                     help="train task CHILD on PARENT's positives (PARENT none: on all rows); overrides inference")
    isp.add_argument("--exclude", action="append", metavar="COL", help="column that is not a feature")
    isp.add_argument("--categorical", action="append", metavar="COL", help="hash this column (overrides the kind)")
    isp.add_argument("--numeric", action="append", metavar="COL", help="scale this column (overrides the kind)")
    isp.add_argument("--group-key", default=None, metavar="COL", help="GAUC groups, e.g. the user (default: none)")
    isp.add_argument("--request-id", default=None, metavar="COL",
                     help="default: a column named request_id; not a feature unless --categorical names it too")
    isp.add_argument("--timestamp", default=None, metavar="COL", help="default: a timestamp-typed column")
    isp.add_argument("--collision-target", type=float, default=0.01, metavar="F",
                     help="expected share of a table's values that share an id (default 0.01)")
    isp.add_argument("--hash-seed", type=int, default=20261121, metavar="N", help="seed of every table's hash")
    isp.add_argument("--max-rows", type=_positive, default=1_000_000, metavar="N", help="rows read for the statistics")
    isp.add_argument("--max-buckets", type=_positive, default=1 << 20, metavar="N", help="largest table proposed")
    isp.add_argument("--out", default=None, metavar="PATH", help="write the YAML here (default: stdout)")
    isp.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    isp.set_defaults(func=_cmd_init_spec)

    t = sub.add_parser("train", help="train on the window before --date, evaluate on --date")
    t.add_argument("--config", default=None, help="job YAML (default: the embedded demo job)")
    t.add_argument("--date", type=_date, required=True, help="evaluation day D; trains on the days before it")
    t.add_argument("--resume", action="store_true", help="continue from the run's last intact checkpoint")
    t.add_argument("--data", default=None, help="override the config's data root")
    t.add_argument("--work-dir", default=None, help="override the config's work_dir")
    t.add_argument("--no-track", action="store_true", help="keep the outcome on disk only (no MLflow run)")
    t.add_argument("--nproc", type=_positive, default=1,
                   help="data-parallel ranks on this machine (launches torchrun; default 1: one process)")
    t.add_argument("--parent", default=None, help=argparse.SUPPRESS)   # daily -> its ranks: the warm-start parent
    t.add_argument("--for-daily", action="store_true", help=argparse.SUPPRESS)   # daily prints the outcome itself
    t.set_defaults(func=_cmd_train)

    e = sub.add_parser("evaluate", help="offline report for a saved model on one day")
    e.add_argument("--model", required=True, help="models:/NAME@alias, models:/NAME/VERSION, runs:/ID/model, "
                   "or a saved model directory (a run's model/)")
    e.add_argument("--config", default=None, help="job YAML: the MLflow store (tracking_uri, else "
                   "work_dir/mlflow.db) and work_dir (default: the embedded demo job)")
    e.add_argument("--tracking-uri", default=None, help="MLflow URI for models:/ references (overrides the "
                   "config; default: the config's, else $MLFLOW_TRACKING_URI)")
    e.add_argument("--data", default=None, help="root of the day partitions (default: the config's data)")
    e.add_argument("--date", type=_date, required=True, help="the day evaluated (DATA/dt=DATE/ or the root's own day folder)")
    e.add_argument("--baseline", default=None, help="second model to compare against (same forms as --model)")
    e.add_argument("--out", default=None, help="report directory (default: WORK_DIR/reports/DATE)")
    e.add_argument("--max-rows", type=_positive, default=None, help="evaluate the first N rows (default: all)")
    e.add_argument("--work-dir", default=None, help="override the config's work_dir")
    e.add_argument("--quarantine-dir", default=None,
                   help="where bad rows go when the model's spec says on_bad_row: quarantine "
                        "(default: WORK_DIR/quarantine/evaluate)")
    e.set_defaults(func=_cmd_evaluate)

    sc = sub.add_parser("score", help="rank one day's candidates: model -> fusion -> rules -> Parquet")
    sc.add_argument("--model", required=True, help="models:/NAME@champion, models:/NAME/VERSION, runs:/ID/model, "
                    "or a saved model directory")
    sc.add_argument("--candidates", required=True, help="candidate Parquet file, or a folder (its folder of "
                    "DATE, dt=DATE/ or ds=YYYYMMDD/ and the like, when present)")
    sc.add_argument("--date", type=_date, required=True, help="the serving day (caps, campaigns, new items)")
    sc.add_argument("--out", required=True, help="ranked lists Parquet file (written atomically)")
    sc.add_argument("--config", default=None, help="job YAML: the store, and its `score:` section (fusion and "
                    "rules) (default: the embedded demo job)")
    sc.add_argument("--exposures", default=None, help="Parquet from `mtrank exposures` (overrides the config)")
    sc.add_argument("--tracking-uri", default=None, help="MLflow URI (default: the config's)")
    sc.add_argument("--data", default=None, help=argparse.SUPPRESS)
    sc.add_argument("--work-dir", default=None, help="override the config's work_dir")
    sc.add_argument("--show", type=int, default=3, help="print the first N ranked requests")
    sc.add_argument("--no-track", action="store_true", help="do not log the run to MLflow")
    sc.set_defaults(func=_cmd_score)

    tf = sub.add_parser("tune-fusion", help="search the fusion factors' offsets and exponents on a held-out "
                        "logged day (value@K or NDCG@K; tune/holdout split by request)")
    tf.add_argument("--model", required=True, help="models:/NAME@champion, models:/NAME/VERSION, runs:/ID/model, "
                    "or a saved model directory")
    tf.add_argument("--data", default=None, help="root of the day partitions, impression logs with labels "
                    "(default: the config's data)")
    tf.add_argument("--date", type=_date, required=True, help="the logged day D; reads DATA/dt=D/ (or the root's own day folder)")
    tf.add_argument("--config", default=None, help="job YAML: the store, and score.fusion as the starting "
                    "point (default: the embedded demo job)")
    tf.add_argument("--k", type=_positive, default=10, help="cut-off of value@K and NDCG@K")
    tf.add_argument("--trials", type=_positive, default=200, help="evaluations in all (start + random + refine)")
    tf.add_argument("--objective", choices=["value", "ndcg"], default=None,
                    help="what the search maximises (default: value when score.tune names a value column, else ndcg)")
    tf.add_argument("--max-rows", type=_positive, default=None, help="use the first N rows (whole requests)")
    tf.add_argument("--seed", type=int, default=0, help="seed of the random search and the tune/holdout split")
    tf.add_argument("--json", default=None, help="write the result with every trial here")
    tf.add_argument("--tracking-uri", default=None, help="MLflow URI (default: the config's)")
    tf.add_argument("--work-dir", default=None, help="override the config's work_dir")
    tf.add_argument("--no-track", action="store_true", help="do not log the run to MLflow")
    tf.set_defaults(func=_cmd_tune_fusion)

    pr = sub.add_parser("promote", help="move alias champion to the challenger if it is no worse on --date")
    pr.add_argument("--config", default=None, help="job YAML: store, model name and the promote: gate "
                    "(default: the embedded demo job)")
    pr.add_argument("--tracking-uri", default=None, help="MLflow URI (overrides the config's)")
    pr.add_argument("--name", default=None, help="registered model name (default: the config's)")
    pr.add_argument("--date", type=_date, required=True, help="held-out day both models are evaluated on")
    pr.add_argument("--data", default=None, help="override the config's data root")
    pr.add_argument("--work-dir", default=None, help="override the config's work_dir")
    pr.set_defaults(func=_cmd_promote)

    dl = sub.add_parser("daily", help="train -> evaluate -> promote for one date (what a scheduler calls)")
    dl.add_argument("--config", default=None, help="job YAML (default: the embedded demo job)")
    dl.add_argument("--date", type=_date, required=True, help="evaluation day D; trains on the days before it")
    dl.add_argument("--data", default=None, help="override the config's data root")
    dl.add_argument("--work-dir", default=None, help="override the config's work_dir")
    dl.add_argument("--force", action="store_true", help="retrain even if this date already has a version")
    dl.add_argument("--wait", action="store_true", help="wait for a running job instead of exiting")
    dl.add_argument("--nproc", type=_positive, default=1,
                    help="train as N data-parallel ranks on this machine (torchrun); tracking stays in this process")
    dl.add_argument("--full", action="store_true", help="retrain from scratch on window_days even where the "
                    "config warm-starts (schedule it e.g. weekly)")
    dl.set_defaults(func=_cmd_daily)

    ln = sub.add_parser("lineage", help="a version's chain of warm starts back to its full retrain")
    ln.add_argument("--config", default=None, help="job YAML: the store and model name (default: the embedded "
                    "demo job)")
    ln.add_argument("--tracking-uri", default=None, help="MLflow URI (overrides the config's)")
    ln.add_argument("--name", default=None, help="registered model name (default: the config's)")
    ln.add_argument("--version", default="champion", help="version number or alias (default champion)")
    ln.add_argument("--work-dir", default=None, help="override the config's work_dir")
    ln.set_defaults(func=_cmd_lineage)
    return p


def _rank_tag() -> str:
    from mtrank.pipeline.ranks import from_env

    d = from_env()
    return f" [rank {d.rank}/{d.world_size}]" if d.enabled else ""


def _logging(verbose: bool) -> None:
    """Under torchrun every rank logs with its rank in the line; ranks other than 0 only warnings."""
    from mtrank.pipeline.ranks import from_env

    d = from_env()
    level = logging.DEBUG if verbose else logging.INFO if d.is_main else logging.WARNING
    where = f" [rank {d.rank}/{d.world_size}]" if d.enabled else ""
    logging.basicConfig(level=level, format=f"%(asctime)s %(levelname)s{where} %(name)s: %(message)s",
                        stream=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    _logging(args.verbose)
    import signal

    from mtrank.jobs.process_memory import keep_freed_memory

    keep_freed_memory()   # batches reuse the heap instead of page-faulting fresh memory each time

    # a scheduler's stop (SIGTERM) unwinds like Ctrl-C: the live MLflow run ends KILLED, files stay whole
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        return args.func(args)
    except PeerFailed as e:      # another rank failed and reports the cause itself
        print(f"mtrank {args.command}{_rank_tag()}: {e}", file=sys.stderr)
        return 1
    except MtrankError as e:     # every user-facing error: one line, exit 2
        print(f"mtrank {args.command}{_rank_tag()}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
