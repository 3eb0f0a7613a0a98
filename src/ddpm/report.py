"""Run records and the reports built from them: one row per run of a folder or a `-m` sweep.

Every training run keeps `<run dir>/run.json` (the `ddpm.callbacks.RunRecord` callback, rank 0): its status (running,
finished, failed, stopped), the step reached, the training wall time, the last value of every logged scalar and
the history of each (`train/*` every `trainer.log_every_n_steps` steps, `val/*` at each validation and
evaluation). The record is rewritten atomically as the run goes, so a run that was killed still has one; a
"running" record whose run dir no process holds any more (ddpm.runlock) reads as stopped.

`summarize(folder)` turns the run dirs below a folder into rows: the overrides that vary across them (from each
run's `.hydra/overrides.yaml`), status, steps, wall time, the last `train/loss` and `val/loss`, and every `val/*`
metric's last and best value with the step of the best. Jobs of a sweep that failed before they had a run dir
(a bad value refused at start) are recorded by the `SweepSummary` Hydra callback in `<sweep dir>/.jobs/` and
appear as failed rows. A record that cannot be read (not JSON, or not of RunRecord's shape: `read_record`) keeps
its row, with status "unreadable" and the reason in its error column: a user of a sweep's summary sees every job,
and one damaged file ends neither the summary of the others nor the sweep that rewrites it after each job. The
command line warns of each such row in one line, and refuses in one `error:` line (exit 2) a folder that is
itself one run with such a record. `write_summary` writes `summary.csv` and `summary.md`; `plot` draws one metric
against steps, one line per run.

    python -m ddpm.report outputs/multirun/2026-12-02/10-00-00                 # the table, summary.csv, summary.md
    python -m ddpm.report outputs/multirun/2026-12-02/10-00-00 --plot val/loss  # and val_loss.png
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable

import yaml
from hydra.experimental.callback import Callback as HydraCallback
from omegaconf import DictConfig

from ddpm import runlock
from ddpm.errors import ConfigError, first_line

RECORD = "run.json"
JOBS = ".jobs"  # <sweep dir>/.jobs/<job number>.json: what Hydra said of each job
FIXED_COLUMNS = ("job", "run_dir", "status", "step", "wall_min", "train/loss", "val/loss")


def _write_text(path: Path, text: str) -> None:
    """Write-then-rename, through a file of this process's own: a reader never sees half a file, and the jobs of a
    sweep that end at once (submitit) do not write into each other's."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: Path, data: dict[str, Any]) -> None:
    _write_text(path, json.dumps(data, indent=1))


# ---- reading: rows from run dirs ---------------------------------------------------------------------------


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_series(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(p, list) and len(p) == 2 and _is_int(p[0]) and _is_number(p[1]) for p in v)


# run.json's keys as ddpm.callbacks.RunRecord writes them: key -> (required, the rule, what is accepted); the rules
# of `last` and `history` hold for each metric in them
RECORD_KEYS = {
    "status": (True, lambda v: isinstance(v, str), "a string (running, finished, failed, stopped)"),
    "step": (True, lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "wall_s": (False, _is_number, "a number of seconds"),
    "error": (False, lambda v: v is None or isinstance(v, str), "null or a string"),
    "last": (False, _is_number, "a number"),
    "history": (False, _is_series, "a list of [step, value] pairs"),
}  # fmt: skip
PER_METRIC = ("last", "history")
# what sweep jobs' files (<sweep dir>/.jobs/<n>.json, SweepSummary) hold
JOB_KEYS = {
    "run_dir": (True, lambda v: isinstance(v, str), "a path"),
    "status": (True, lambda v: isinstance(v, str), "a string (finished, failed)"),
    "overrides": (False, lambda v: isinstance(v, list) and all(isinstance(o, str) for o in v), "a list of key=value strings"),
    "error": (False, lambda v: v is None or isinstance(v, str), "null or a string"),
}  # fmt: skip


def _read_object(path: Path, keys: dict[str, tuple[bool, Callable[[Any], bool], str]], what: str) -> dict[str, Any]:
    """The JSON object at `path`; ConfigError naming the file (and the key) unless it is JSON, an object, and holds
    `keys` as their rules accept (those of PER_METRIC: an object whose every value the rule accepts)."""
    what = f"{what}, a JSON object with {' and '.join(json.dumps(k) for k, rule in keys.items() if rule[0])}"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:  # unreadable, not UTF-8, or not JSON (a file cut short)
        raise ConfigError(f"{path}: not readable JSON ({first_line(e)}); expected {what}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: holds a JSON {type(data).__name__}; expected {what}")
    for key, (required, ok, accepted) in keys.items():
        if key not in data:
            if required:
                raise ConfigError(f"{path}: no {json.dumps(key)}; expected {what}")
            continue
        value = data[key]
        if key in PER_METRIC:
            if not isinstance(value, dict):
                raise ConfigError(f"{path}: {key}={_shown(value)} is invalid; expected an object of metric name: {accepted}")
            bad = next((name for name, entry in value.items() if not ok(entry)), None)
            if bad is not None:
                raise ConfigError(f"{path}: {key}.{bad}={_shown(value[bad])} is invalid; expected {accepted}")
        elif not ok(value):
            raise ConfigError(f"{path}: {key}={_shown(value)} is invalid; expected {accepted}")
    return data


def _shown(value: Any) -> str:
    """A JSON value in an error line, cut to 40 characters."""
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def read_record(path: str | os.PathLike) -> dict[str, Any]:
    """A run's record (`<run dir>/run.json`); ConfigError naming the file and the key when it is not JSON or not of
    RunRecord's shape (RECORD_KEYS)."""
    return _read_object(Path(path), RECORD_KEYS, "a run record")


def _overrides(run_dir: Path) -> dict[str, str]:
    """The run's key=value overrides; none when its overrides.yaml is absent or is not a YAML list of strings."""
    path = run_dir / ".hydra" / "overrides.yaml"
    try:
        items = yaml.safe_load(path.read_text()) if path.is_file() else None
    except (OSError, ValueError, yaml.YAMLError):  # a damaged file: the row stays, without its overrides
        items = None
    return dict(o.split("=", 1) for o in items if isinstance(o, str) and "=" in o) if isinstance(items, list) else {}


def _status(record: dict[str, Any], run_dir: Path) -> str:
    status = record.get("status", "unknown")
    if status == "running" and not runlock.held_by_another(run_dir):
        return "stopped"  # the process that wrote "running" is gone: killed, or the machine went down
    return status


def _job_number(run_dir: Path, root: Path) -> str:
    """The run's name in the table: its path below `root` (a sweep's job number), or its folder's name."""
    try:
        rel = run_dir.resolve().relative_to(root.resolve())
    except ValueError:
        return run_dir.name
    return str(rel) if str(rel) != "." else run_dir.name


def _row(root: Path, run_dir: Path, record: dict[str, Any], overrides: dict[str, str]) -> dict[str, Any]:
    from ddpm.metrics import HIGHER_IS_BETTER  # here: the report's command line starts without torch until it reads a run

    row: dict[str, Any] = {"job": _job_number(run_dir, root), "run_dir": str(run_dir), "status": _status(record, run_dir),
                           "step": record.get("step"), "wall_min": round(record["wall_s"] / 60, 2) if "wall_s" in record else None}  # fmt: skip
    last = record.get("last", {})
    row["train/loss"], row["val/loss"] = last.get("train/loss"), last.get("val/loss")
    for name, series in sorted(record.get("history", {}).items()):
        if not name.startswith("val/") or name == "val/loss" or not series:
            continue
        row[name] = series[-1][1]
        if name.endswith(("_floor", "_std")):  # a reference value, not a score to rank
            continue
        higher_is_better = name.endswith(HIGHER_IS_BETTER)
        best_step, best = max(series, key=lambda p: (p[1], -p[0])) if higher_is_better else min(series, key=lambda p: (p[1], p[0]))
        row[f"{name} best"], row[f"{name} best step"] = best, best_step
    if record.get("error"):
        row["error"] = record["error"]
    row["_overrides"] = overrides
    return row


def summarize(root: str | os.PathLike) -> list[dict[str, Any]]:
    """One row per run dir below `root` (the folder itself when it is one run), then one per failed sweep job that
    left no run dir; columns: FIXED_COLUMNS, the overrides that vary across the rows, the val/* metrics. A record
    or job file that cannot be read (read_record) gives a row with status "unreadable" and the reason as its error."""
    root = Path(root)
    rows = []
    for record_path in sorted(root.rglob(RECORD), key=lambda p: _natural(p.parent, root)):
        if JOBS in record_path.parts:
            continue
        try:
            record = read_record(record_path)
        except ConfigError as e:
            record = {"status": "unreadable", "error": first_line(e)}
        rows.append(_row(root, record_path.parent, record, _overrides(record_path.parent)))
    seen = {Path(r["run_dir"]).resolve() for r in rows}
    for job_path in sorted((root / JOBS).glob("*.json"), key=lambda p: int(p.stem) if p.stem.isdigit() else 0):
        try:
            job = _read_object(job_path, JOB_KEYS, "a sweep job's record")
        except ConfigError as e:
            rows.append(_row(root, job_path, {"status": "unreadable", "error": first_line(e)}, {}) | {"job": job_path.stem})
            continue
        run_dir = Path(job["run_dir"])
        if run_dir.resolve() in seen:
            continue
        overrides = dict(o.split("=", 1) for o in job.get("overrides", []) if "=" in o)
        record = {"status": job["status"], "error": job.get("error")}
        rows.append(_row(root, run_dir, record, overrides) | {"job": job_path.stem})
    varying = sorted({k for r in rows for k in r["_overrides"] if len({r["_overrides"].get(k) for r in rows}) > 1})
    for r in rows:
        overrides = r.pop("_overrides")
        for k in varying:
            r[k] = overrides.get(k)
    return rows


def _natural(run_dir: Path, root: Path) -> tuple:
    """Sort key: job 2 before job 10, numbers before names."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in run_dir.relative_to(root).parts)


def columns(rows: list[dict[str, Any]]) -> list[str]:
    """The table's columns in order: job and run, the varying overrides, status and progress, losses, metrics."""
    seen: list[str] = []
    for r in rows:
        seen += [k for k in r if k not in seen]
    fixed = [c for c in FIXED_COLUMNS if c in seen]
    overrides = [c for c in seen if c not in FIXED_COLUMNS and not c.startswith("val/") and c != "error"]
    metrics = [c for c in seen if c.startswith("val/") and c != "val/loss"]
    return fixed[:2] + overrides + fixed[2:] + metrics + (["error"] if "error" in seen else [])


def _cell(v: Any) -> str:
    if v is None:
        return ""
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def write_summary(root: str | os.PathLike, rows: list[dict[str, Any]] | None = None) -> tuple[Path, Path]:
    """`<root>/summary.csv` and `<root>/summary.md` from `summarize(root)`; returns their paths."""
    root = Path(root)
    rows = summarize(root) if rows is None else rows
    cols = columns(rows)
    csv_path, md_path = root / "summary.csv", root / "summary.md"
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    _write_text(csv_path, text.getvalue())
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in cols) + " |" for r in rows]
    _write_text(md_path, "\n".join(lines) + "\n")
    return csv_path, md_path


def print_table(rows: list[dict[str, Any]], title: str) -> None:
    """The summary on the terminal (rich), without the run dirs."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=title)
    cols = [c for c in columns(rows) if c != "run_dir"]
    for c in cols:
        table.add_column(c, overflow="fold")
    for r in rows:
        table.add_row(*(escape(_cell(r.get(c))) for c in cols))  # cells are text: an error's [brackets] are not markup
    Console(width=None if sys.stdout.isatty() else 200).print(table)


def plot(root: str | os.PathLike, metric: str, out: str | os.PathLike | None = None) -> Path:
    """`metric` against steps for every run below `root`, one line per run (labelled by its varying overrides); a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    root = Path(root)
    rows = summarize(root)
    varying = [c for c in columns(rows) if c not in FIXED_COLUMNS and not c.startswith("val/") and c != "error"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    drawn = 0
    for r in rows:
        try:
            series = read_record(Path(r["run_dir"]) / RECORD).get("history", {}).get(metric, [])
        except ConfigError:  # no record (a job that failed at start) or an unreadable one (its row says why): no line
            series = []
        if series:
            label = ", ".join(f"{k}={r[k]}" for k in varying) or r["job"]
            ax.plot([p[0] for p in series], [p[1] for p in series], marker="o" if len(series) < 20 else None, label=f"{r['job']}: {label}")
            drawn += 1
    if not drawn:
        plt.close(fig)
        raise ConfigError(f"no run below {root} logged {metric}; logged: {', '.join(sorted({k for r in rows for k in r if '/' in k})) or 'nothing'}")
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric}: {root}")
    ax.legend(fontsize=8)
    out = Path(out) if out else root / f"{metric.replace('/', '_')}.png"
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


# ---- the Hydra callback of -m sweeps ---------------------------------------------------------------------------


class SweepSummary(HydraCallback):
    """After every job of a `-m` sweep: record what Hydra returned (<sweep dir>/.jobs/<n>.json) and rewrite
    <sweep dir>/summary.csv and summary.md, so they hold every job that ended even when the sweep is cut short;
    at the end of the sweep, also the table on the terminal."""

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        from hydra.core.utils import JobStatus
        from hydra.types import RunMode

        if config.hydra.mode != RunMode.MULTIRUN:
            return
        sweep = Path(config.hydra.sweep.dir)
        failed = job_return.status == JobStatus.FAILED
        error = job_return._return_value if failed else None
        (sweep / JOBS).mkdir(parents=True, exist_ok=True)
        write_json(sweep / JOBS / f"{config.hydra.job.num}.json", {
            "num": config.hydra.job.num, "run_dir": config.hydra.runtime.output_dir,
            "overrides": list(job_return.overrides or []), "status": "failed" if failed else "finished",
            "error": None if error is None else getattr(error, "reason", None) or f"{type(error).__name__}: {error}".splitlines()[0],
        })  # fmt: skip
        write_summary(sweep)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep = Path(config.hydra.sweep.dir)
        if (sweep / JOBS).is_dir():
            rows = summarize(sweep)
            write_summary(sweep, rows)
            print_table(rows, f"sweep {sweep}: summary.csv, summary.md")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m ddpm.report", description="Summarize the runs below a folder (a -m sweep dir, outputs/runs, ...).")
    p.add_argument("folder")
    p.add_argument("--plot", metavar="METRIC", help="also draw METRIC (e.g. val/loss, train/loss, val/fid) against steps, one line per run")
    p.add_argument("--out", help="the plot's PNG (default: <folder>/<metric>.png)")
    args = p.parse_args(argv)
    try:
        run_report(Path(args.folder), args.plot, args.out)
    except ConfigError as e:  # a bad folder or record: one line, exit status 2, as train.py and sample.py
        print(f"error: {first_line(e)}", file=sys.stderr)
        raise SystemExit(2) from None


def run_report(root: Path, plot_metric: str | None = None, out: str | None = None) -> None:
    """The command's work: summarize the runs below `root`, write summary.csv/.md and print the table (and plot
    `plot_metric`); ConfigError for a folder that is missing, holds no run, or is one run with a bad record."""
    if not root.is_dir():
        raise ConfigError(f"{root}: no such folder (expected a sweep dir or a folder of run dirs)")
    if (root / RECORD).is_file():  # the folder is one run: its record is the whole report, so a bad one is refused
        read_record(root / RECORD)
    rows = summarize(root)
    if not rows:
        raise ConfigError(f"{root}: no run below it has a {RECORD} (runs of this version of ddpm write one)")
    for r in rows:
        if r["status"] == "unreadable":
            print(f"warning: {r['error']}; its row says status unreadable", file=sys.stderr)
    csv_path, md_path = write_summary(root, rows)
    print_table(rows, f"{root}: {len(rows)} run(s)")
    print(f"wrote {csv_path} and {md_path}")
    if plot_metric:
        print(f"wrote {plot(root, plot_metric, out)}")


if __name__ == "__main__":
    main(sys.argv[1:])
