"""The command line: the ``ctd`` command, and the shared entry point of the ``jobs/`` (``job_main``).

    ctd calibrate --scores FILE --alpha A --delta D [--pareto|--no-pareto] [--risk accuracy|auroc] --out DIR
    ctd report fetch URI [--to DIR]        download a run's or a calibration's report
    ctd report show URI_OR_DIR             print a report's summary
    ctd report verify RUN_URI [--corpus URI]   check a published run (manifest, files, counts, duplicates, every corpus id once)
    ctd monitor calibrate ...              calibrate an online alarm threshold (see `ctd monitor calibrate -h`)
    ctd plan --rows N [--config C] [--calibration URI] [--budget-gpu-hours B | --budget-money M]
                                           the judge pool a night needs, and the largest α a budget allows

Bad input (unreadable or malformed files, missing columns, NaN, labels not 0/1, probabilities
outside [0, 1], levels outside (0, 1), a config error) prints one line starting with "error:" and
exits with code 2.

The jobs (``ray job submit ... -- python -m jobs.<name> --config FILE [--set KEY=VALUE ...]``) share
:func:`job_main`: bad input (a config error, a missing or tampered artifact, a corpus that cannot be
found) prints one line starting with "error:" and exits 2 before anything is written; a run id whose
lease another driver holds, or took over from this one, prints one line and exits 4.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import yaml

if TYPE_CHECKING:
    from pydantic import BaseModel

__all__ = ["main", "UsageError", "job_main"]


def _positive(name):
    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            v = 0
        if v < 1:
            raise argparse.ArgumentTypeError(f"{name} must be a whole number >= 1, got {s!r}")
        return v

    return parse


class UsageError(Exception):
    """Bad input: reported in one line, exit code 2."""


def _level(name):
    def parse(s: str) -> float:
        try:
            x = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number in (0, 1), got {s!r}") from None
        from .stats.pvalues import check_level

        try:
            return check_level(x, name)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return parse


def _cmd_calibrate(args) -> int:
    import numpy as np
    from pydantic import ValidationError

    from .calibration.calibrator import CalibrationScores, Calibrator
    from .calibration.report import write_calibration
    from .config import CalibrationConfig
    from .stats.calibrate import threshold_grid
    from .stats.cascade import Cascade
    from .tables import read_table

    try:
        settings = CalibrationConfig(
            alpha=args.alpha,
            delta=args.delta,
            pareto=args.pareto,
            risk=args.risk,
            performance_target=args.performance_target,
            method=args.method,
            seed=args.seed,
            opt_fraction=args.opt_fraction,
        )
    except ValidationError as e:  # one line for every problem
        raise UsageError("; ".join(f"{'.'.join(map(str, x['loc'])) or 'settings'}: {x['msg']}" for x in e.errors())) from None
    scores = CalibrationScores.from_table(read_table(args.scores), args.scores)
    if args.grid_scores:
        ref = read_table(args.grid_scores)
        if "dv" not in ref.column_names:
            raise UsageError(f"{args.grid_scores}: no 'dv' column to build the threshold grid from")
        grid = threshold_grid(
            reference=np.asarray(ref.column("dv").to_numpy(zero_copy_only=False), dtype=float), size=args.grid_size
        )
    else:
        grid = threshold_grid(size=args.grid_size, low=args.grid_low, high=args.grid_high)
    art = Calibrator(settings, Cascade(args.cascade)).fit(
        scores, grid, {"scores_uri": args.scores, "grid": "reference quantiles" if args.grid_scores else "uniform"}
    )
    uris = write_calibration(args.out, art, scores.dv, args.night_rows)
    print(art.result.message)
    print(f"calibration artifact: {uris['artifact']}")
    print(f"report: {uris['html']}")
    return 0


def _positive_float(name):
    def parse(s: str) -> float:
        try:
            v = float(s[:-1]) * {"h": 3600, "m": 60, "s": 1}[s[-1]] if s and s[-1] in "hms" else float(s)
        except ValueError:
            v = float("nan")
        if not v > 0 or v == float("inf"):
            raise argparse.ArgumentTypeError(f"{name} must be a positive number, got {s!r}")
        return v

    return parse


def _cmd_plan(args: argparse.Namespace) -> int:
    """Print (or --json) the night's plan at the calibrated α; exit 1 when the quota cannot meet it."""
    import json

    from .calibration.artifact import load_calibration
    from .calibration.plan import EPSILON, Pool, largest_alpha, plan_night

    v = None
    control, calibration = {"control_share": 0.0}, args.calibration
    if args.config:
        from .config import load_config

        cfg = load_config(args.config)
        v = cfg.expert.vllm if cfg.expert.kind == "vllm" else None
        if cfg.audit is not None:
            a = cfg.audit
            control = {"control_share": a.control_share, "control_floor": a.control_floor, "control_ceiling": a.control_ceiling}
            calibration = calibration or a.calibration
    if calibration is None:
        raise UsageError("ctd plan needs --calibration (or --config with audit.calibration)")

    def pick(flag, from_config, what):
        if flag is not None:
            return flag
        if from_config is not None:
            return from_config
        raise UsageError(f"ctd plan needs {what} (or --config with a vllm expert that sets it)")

    pool = Pool(
        rows_per_second=pick(args.rows_per_second, v and v.rows_per_second_per_replica, "--rows-per-second"),
        gpus_per_replica=pick(args.gpus_per_replica, v and v.tensor_parallel_size * v.num_gpus_per_replica, "--gpus-per-replica"),
        window_s=pick(args.window, v and v.target_wall_seconds, "--window"),
        quota=args.quota if args.quota is not None else (v.max_replicas if v is not None else None),
        gpu_hour_price=args.gpu_hour_price if args.gpu_hour_price is not None else (v.gpu_hour_price if v else None),
    )
    if args.control_share is not None:
        control["control_share"] = args.control_share
    art = load_calibration(calibration)
    cal = art.result
    plan = plan_night(args.rows, cal.alpha, cal.delta, pool, **control, cal=cal, lambda_star=art.threshold)
    calls_for = lambda gpu_hours: gpu_hours / pool.gpus_per_replica * 3600 * pool.rows_per_second  # noqa: E731
    limit = None
    if args.budget_money is not None:
        if pool.gpu_hour_price is None:
            raise UsageError("--budget-money needs a price: --gpu-hour-price, or expert.vllm.gpu_hour_price in the config")
        limit = ("the budget " + _money(args.budget_money), calls_for(args.budget_money / pool.gpu_hour_price))
    elif args.budget_gpu_hours is not None:
        limit = (f"the budget of {args.budget_gpu_hours:,.1f} GPU-hours", calls_for(args.budget_gpu_hours))
    elif pool.quota is not None:
        limit = (f"the quota of {pool.quota} replicas in the {pool.window_s / 3600:g} h window", pool.calls_in(pool.quota))
    inverse = largest_alpha(args.rows, limit[1], cal.delta, pool, **control, cal=cal) if limit else None
    if args.json:
        print(json.dumps({"plan": plan.to_dict(), "limit": limit and limit[0], "largest_alpha": inverse and inverse.to_dict()}))
    else:
        print("\n".join(_plan_lines(plan, pool, art, inverse, limit and limit[0], EPSILON)))
    return 0 if plan.fits else 1


def _money(x: float) -> str:
    return f"{x:,.2f}"


def _plan_lines(plan, pool, art, inverse, limit: str | None, eps: float) -> list[str]:
    cal = art.result
    lam = "never delegate" if art.threshold is None else f"{art.threshold:.4g}"
    perf = lambda p: "" if p.performance is None else f"; {cal.risk or 'performance'} {p.performance:.3f} on the calibration set"  # noqa: E731
    price = pool.gpu_hour_price
    cost = lambda gh, c: f"{gh:,.1f} GPU-hours" + ("" if c is None else f", {_money(c)} at {price:g} a GPU-hour")  # noqa: E731
    out = [
        f"A night of {plan.rows:,} conversations with calibration {art.hash[:12]} (α {cal.alpha:g}, δ {cal.delta:g}, "
        f"λ* {lam}{perf(plan)}):",
        f"  judge calls: with probability ≥ {1 - cal.delta:.0%} the traffic's delegated rate is at most {cal.alpha:g} (if the "
        f"night's traffic is like the calibration rows), so the night sends at most {plan.delegated_bound:,} delegated "
        f"rows with probability ≥ {1 - cal.delta - eps:.0%}, plus "
        f"about {plan.control_calls:,} control rows (the control sample's expected size; those also delegated are "
        f"judged once, so this counts them twice, to be safe): {plan.calls:,} calls (only audit.budget_cap bounds a "
        "night outright)",
        f"  pool: {plan.replicas} replica(s) of {pool.gpus_per_replica:g} GPU(s) at {pool.rows_per_second:g} rows/s each "
        f"judge them in the {pool.window_s / 3600:g} h window",
        f"  cost: {cost(plan.gpu_hours, plan.cost)} of busy replicas (start-up not counted); every row to the judge "
        f"instead: {cost(plan.all_judge_gpu_hours, plan.all_judge_cost)}",
    ]
    if not plan.fits:
        out.append(
            f"REFUSED: the quota is {pool.quota} replicas, {plan.short_by} short of the {plan.replicas} needed; on "
            f"{pool.quota} the judge stage would take {plan.hours:.1f} h instead of {pool.window_s / 3600:g} h"
        )
    if limit and inverse is None:
        out.append(f"Within {limit}: no α fits (the control sample alone needs {plan.control_calls:,} calls)")
    elif limit and inverse is not None:
        lam2 = "never delegates (nothing certified at that α)" if inverse.lambda_star is None else f"λ* {inverse.lambda_star:.4g}"
        out.append(
            f"Within {limit}: the largest α is {inverse.alpha:.4f} ({inverse.calls:,} calls, {inverse.replicas} replica(s), "
            f"{cost(inverse.gpu_hours, inverse.cost)}); recertified on the calibration's {cal.n:,} rows by budget-only "
            f"LTT it gives {lam2}{perf(inverse)}"
        )
    return out


def _cmd_show(args: argparse.Namespace) -> int:
    from .audit.report import show_report

    print(show_report(args.uri))
    return 0


def _cmd_fetch(args: argparse.Namespace) -> int:
    from .runs.fetch import fetch

    dest, written = fetch(args.uri, args.to, data=args.data)
    for path in written:
        print(path)
    print(
        f"fetched into {dest}: open it with `ctd report show {dest}`"
        + (f" or `ctd report verify {dest}`" if args.data else "")
        + (
            f"; the nights fetched so far: `ctd report history {args.to}`"
            if os.path.basename(os.path.dirname(dest)) == "runs"
            else ""
        )
    )
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    import json

    from . import storage
    from .runs.verify import verify_run

    if not storage.exists(args.uri):
        raise UsageError(f"{args.uri}: no such folder (give a run folder: <output>/runs/<run_id>, or a copy of one)")
    res = verify_run(args.uri, corpus=args.corpus)
    if args.json:
        sys.stdout.buffer.write((json.dumps(res, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))
    else:
        counts = ", ".join(
            f"{k.replace('_', ' ')} {v}"
            for k, v in res.items()
            if k not in ("ok", "problems", "published", "run_id", "counted_with")
        )
        print(f"{args.uri}: {'ok' if res['ok'] else 'NOT OK'}" + (f" ({counts})" if res.get("published") else ""))
        for p in res["problems"]:
            print(f"  - {p}")
    return 0 if res["ok"] else 1


def _cmd_history(args: argparse.Namespace) -> int:
    from .runs.folder import list_runs
    from .runs.history import history, history_text

    out = args.output.rstrip("/")
    if not list_runs(out):
        raise UsageError(
            f"{out}: no published runs under {out}/runs (give the audit output, audit.output, or a folder `ctd report fetch` wrote)"
        )
    h = history(out, calibration_hash=args.calibration, last=args.last)
    print(history_text(h))
    return 1 if (args.strict and h.gaps) else 0


def _cmd_index(args: argparse.Namespace) -> int:
    from .audit.index import write_index

    print(write_index(args.output.rstrip("/")))
    return 0


def _cmd_monitor(args) -> int:
    from .monitor.rules import calibrate_monitor_cli

    return calibrate_monitor_cli(args)


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error in one line (and exit code 2)."""

    def error(self, message):
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} -h)\n")


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="ctd", description="Calibrate-Then-Delegate safety monitoring")
    ap.add_argument("--debug", action="store_true", help="on an error, print the traceback too")
    sub = ap.add_subparsers(dest="cmd", required=True, parser_class=_Parser)

    c = sub.add_parser("calibrate", help="calibrate the delegation threshold from a labelled scores table")
    c.add_argument("--scores", required=True, help="Parquet or JSONL with columns id, label, probe, expert, dv [, group]")
    c.add_argument("--alpha", required=True, type=_level("alpha"), help="budget: largest share of rows sent to the expert")
    c.add_argument("--delta", required=True, type=_level("delta"), help="error level of the guarantee")
    c.add_argument("--pareto", dest="pareto", action="store_true", default=True, help="Pareto testing (default)")
    c.add_argument("--no-pareto", dest="pareto", action="store_false", help="plain budget-only LTT")
    c.add_argument("--risk", choices=("accuracy", "auroc"), default="accuracy", help="performance risk for Pareto testing")
    c.add_argument(
        "--performance-target",
        type=_level("performance target"),
        default=None,
        help="also certify the cascade's misclassification rate <= this (joint guarantee)",
    )
    c.add_argument("--method", choices=("fixed_sequence", "bonferroni", "holm"), default="fixed_sequence")
    c.add_argument("--grid-scores", default=None, help="table from a separate split whose dv quantiles form the grid")
    c.add_argument("--grid-size", type=int, default=1001)
    c.add_argument("--grid-low", type=float, default=-1.0)
    c.add_argument("--grid-high", type=float, default=1.0)
    c.add_argument("--opt-fraction", type=float, default=0.3)
    c.add_argument("--cascade", choices=("switch", "mean"), default="switch")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument(
        "--night-rows",
        type=_positive("--night-rows"),
        default=10_000,
        help="conversations in a typical night (the report's night-level statement)",
    )
    c.add_argument("--out", required=True, help="output folder or URI")
    c.set_defaults(fn=_cmd_calibrate)

    r = sub.add_parser("report", help="fetch, show, verify audit and calibration reports, the nights so far, their index")
    rs = r.add_subparsers(dest="report_cmd", required=True, parser_class=_Parser)
    f = rs.add_parser(
        "fetch", help="copy a published run (its reports) or a calibration into a local folder the tools read as is"
    )
    f.add_argument("uri", help="a run folder (<output>/runs/<run_id>) or a calibration folder, on any store")
    f.add_argument("--to", default=".", help="local folder: a run lands in <to>/runs/<run_id>/ (default: the current folder)")
    f.add_argument("--data", action="store_true", help="copy the results and quarantine too (what `verify` checks)")
    f.set_defaults(fn=_cmd_fetch)
    s = rs.add_parser("show", help="print a report's summary (a run folder, a calibration folder or a report JSON)")
    s.add_argument("uri")
    s.set_defaults(fn=_cmd_show)
    v = rs.add_parser(
        "verify", help="check a run folder, or a copy of one, against its manifest (exit 1 with the reasons if not)"
    )
    v.add_argument("uri", help="a run folder: <output>/runs/<run_id>, or a copy of one")
    v.add_argument("--corpus", default=None, help="the corpus the run audited: every id in it must be accounted for exactly once")
    v.add_argument("--json", action="store_true", help="the result as JSON (UTF-8) on stdout")
    v.set_defaults(fn=_cmd_verify)
    h = rs.add_parser(
        "history", help="the nights so far: one line per audited day with the same calibration, and the unreadable runs"
    )
    h.add_argument(
        "output", help="the audit output (audit.output), or a folder `ctd report fetch` wrote: <output>/runs/ holds the runs"
    )
    h.add_argument("--last", type=_positive("--last"), default=None, help="only the last N nights")
    h.add_argument("--calibration", default=None, help="calibration hash or a prefix of it (default: the latest night's)")
    h.add_argument("--strict", action="store_true", help="exit 1 when a published run could not be read")
    h.set_defaults(fn=_cmd_history)
    ix = rs.add_parser("index", help="write <output>/index.html: every night with its status and report, and the trend")
    ix.add_argument("output", help="the audit output (audit.output)")
    ix.set_defaults(fn=_cmd_index)

    pl = sub.add_parser(
        "plan", help="the judge pool, GPU-hours and cost a night needs, and the largest α a budget or quota allows"
    )
    pl.add_argument("--rows", required=True, type=_positive("--rows"), help="conversations a night")
    pl.add_argument("--config", default=None, help="a job config: the vllm expert's throughput, GPUs, window, quota, price")
    pl.add_argument("--calibration", default=None, help="calibration folder or calibration.json (default: audit.calibration)")
    pl.add_argument(
        "--rows-per-second", type=_positive_float("--rows-per-second"), default=None, help="one replica's measured rows/s"
    )
    pl.add_argument("--gpus-per-replica", type=_positive_float("--gpus-per-replica"), default=None)
    pl.add_argument(
        "--window", type=_positive_float("--window"), default=None, help="the judge stage's time: seconds, or 90m, 2h"
    )
    pl.add_argument("--quota", type=_positive("--quota"), default=None, help="replicas the cluster can give")
    pl.add_argument("--gpu-hour-price", type=_positive_float("--gpu-hour-price"), default=None)
    pl.add_argument(
        "--control-share",
        type=float,
        default=None,
        help="the control sample's share (default: the config's, with its floor and ceiling)",
    )
    budget = pl.add_mutually_exclusive_group()
    budget.add_argument("--budget-gpu-hours", type=_positive_float("--budget-gpu-hours"), default=None)
    budget.add_argument("--budget-money", type=_positive_float("--budget-money"), default=None)
    pl.add_argument("--json", action="store_true")
    pl.set_defaults(fn=_cmd_plan)

    m = sub.add_parser("monitor", help="online monitoring of step-wise verifier scores")
    ms = m.add_subparsers(dest="monitor_cmd", required=True, parser_class=_Parser)
    mc = ms.add_parser("calibrate", help="calibrate an alarm threshold on labelled trajectories")
    mc.add_argument("--trajectories", required=True, help="CSV(.gz)/Parquet/JSONL with trajectory, step, score, label columns")
    mc.add_argument("--risk", choices=("false-alarm", "missed-detection"), required=True)
    mc.add_argument("--control", choices=("crc", "ucb"), required=True)
    mc.add_argument("--epsilon", type=_level("epsilon"), required=True)
    mc.add_argument("--delta", type=_level("delta"), default=0.1)
    mc.add_argument("--trajectory-column", default="uq_problem_idx")
    mc.add_argument("--step-column", default="num_steps")
    mc.add_argument("--score-column", default="judge_probability")
    mc.add_argument("--label-column", default="solved")
    mc.add_argument("--out", required=True)
    m.set_defaults(fn=_cmd_monitor)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    """The ``ctd`` command. Exit codes: 0 done; 1 what was read cannot be trusted (a report or run
    folder that is corrupt, incomplete or modified after publishing; a failed verify); 2 bad usage or
    bad input (a wrong path or run id, a malformed table, a level outside (0, 1), no storage
    credentials). Every error is one line naming the file or URI and what to do; --debug adds the
    traceback."""
    from .model.artifacts import ArtifactError
    from .runs.folder import NotARun, RunError
    from .tables import TableError

    ap = build_parser()
    args = ap.parse_args(argv)  # argparse itself exits with 2 on bad arguments
    try:
        return args.fn(args)
    except Exception as e:
        if args.debug:
            import traceback

            traceback.print_exc()
        target = getattr(args, "uri", None) or getattr(args, "output", None) or getattr(args, "scores", None) or ""
        if (hint := _storage_problem(e, target)) is not None:
            print(f"error: {hint}", file=sys.stderr)
            return 2
        if isinstance(e, NotARun) or (isinstance(e, (UsageError, TableError, FileNotFoundError)) and not isinstance(e, RunError)):
            print(f"error: {e}", file=sys.stderr)
            return 2
        if isinstance(e, (RunError, ArtifactError)):
            print(f"error: {e}", file=sys.stderr)
            return 1
        if isinstance(e, ValueError):
            print(f"error: {e}", file=sys.stderr)
            return 2
        raise


def _storage_problem(e: BaseException, uri: str) -> str | None:
    """One line for an object store that refused us (no credentials, access denied), else None."""
    chain, seen = [], e
    while seen is not None and len(chain) < 10:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    names = {type(x).__name__ for x in chain}
    if names & {"NoCredentialsError", "PartialCredentialsError", "NoAuthTokenError"}:
        return (
            f"{uri}: no credentials for the object store: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and CTD_S3_ENDPOINT for a "
            "store other than AWS S3), or run where the platform provides them (an instance or pod role)"
        )
    text = " ".join(str(x) for x in chain)
    if names & {"PermissionError", "ClientError"} and any(
        k in text
        for k in ("AccessDenied", "Forbidden", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch", "Permission denied")
    ):
        return f"{uri}: access denied by the store: check that the credentials in the environment may read it ({type(chain[-1]).__name__})"
    return None


# ----------------------------------------------------------------------------------------------
# the jobs' entry point
# ----------------------------------------------------------------------------------------------
def _override(s: str) -> tuple[str, object]:
    if "=" not in s:
        raise argparse.ArgumentTypeError(f"--set needs KEY=VALUE, got {s!r}")
    k, v = s.split("=", 1)
    return k.strip(), yaml.safe_load(v)


def job_main(
    name: str,
    run: Callable,
    argv: Sequence[str] | None = None,
    add_args: Callable | None = None,
    config_model: type[BaseModel] | None = None,
) -> int:
    from .config import ConfigError, load_config
    from .model.artifacts import ArtifactError
    from .pipeline.watchdog import Stopped
    from .runs.lease import EXIT_LEASE_HELD, LeaseHeld, LeaseLost
    from .tables import TableError

    ap = argparse.ArgumentParser(prog=f"python -m jobs.{name}")
    ap.add_argument("--config", required=True)
    ap.add_argument("--set", dest="overrides", action="append", type=_override, default=[], metavar="KEY=VALUE")
    if add_args:
        add_args(ap)
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config, dict(args.overrides), model=config_model)
        code = run(cfg, args)
    except (ConfigError, ArtifactError, TableError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except (LeaseHeld, LeaseLost) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return EXIT_LEASE_HELD
    except Stopped as e:  # stuck waiting for resources (1) or past the deadline (6): committed work kept
        print(f"error: {e}", file=sys.stderr, flush=True)
        return e.exit_code
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
