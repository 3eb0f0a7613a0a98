"""Config plumbing for the Hydra entry points: resolvers, checkpoint paths, the Validate callback, one-line errors.

Importing this module registers the OmegaConf resolvers the YAML files use and the config schemas
(ddpm.schema):
- `${or:A,B}`: A unless it is null or empty, else B (run dirs: `outputs/runs/${or:${name},<date>/<time>}`).

A bad value or a missing file ends the process with one line on stderr (`error: <key>=<value> ...`) and exit
status 2 instead of a traceback: `run_cli(main)` does it for what Hydra raises while composing (an unknown
option or key, a wrong type) and for the ddpm.schema checks; `clean_errors()` for what the task raises (data,
checkpoints) and removes the run dir it leaves empty. Set HYDRA_FULL_ERROR=1 to see the traceback.

`Validate`, the Hydra callback named in conf/train.yaml and conf/sample.yaml, runs those checks (and, for
train.py, locks the run dir) before Hydra writes anything.
"""
from __future__ import annotations

import contextlib
import difflib
import os
import re
import shutil
import sys
import time
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterator

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException, ValidationError

from ddpm import runlock
from ddpm.errors import ConfigError, first_line
from ddpm.report import RECORD
from ddpm.schema import check_sample, check_train

OmegaConf.register_new_resolver("or", lambda a, b: b if a in (None, "") else a, replace=True)

LAST = Path("checkpoints") / "last.ckpt"
_ONE_LINE = "DDPM_ONE_LINE_ERRORS"  # set by run_cli: HYDRA_FULL_ERROR=1 is ours, not the user's


def resolve_ckpt(path: str | os.PathLike, key: str = "ckpt") -> Path:
    """A checkpoint file, a diffusers model folder (config.json: itself), or a run dir -> its checkpoints/last.ckpt;
    ConfigError naming `key` when none of them exists."""
    p = Path(path)
    if p.is_dir():
        if (p / LAST).is_file() or (p / "config.json").is_file():
            return p / LAST if (p / LAST).is_file() else p
        raise ConfigError(f"{key}={path}: a folder without {LAST} or a diffusers config.json (expected a checkpoint file, a run dir or a diffusers model folder)")
    if not p.is_file():
        raise ConfigError(f"{key}={path}: no such file or run dir")
    return p


def unreadable_checkpoint(path: Path) -> str | None:
    """Why `path` cannot be a checkpoint, from its first bytes alone, or None when it may be one.

    torch.save writes a zip archive, so a file cut short has the zip header but not the directory at its end;
    an older torch wrote a pickle (first byte 0x80). A diffusers model folder is read by ddpm.diffusers_io instead.
    """
    if path.is_dir():
        return None
    with open(path, "rb") as f:
        head = f.read(4)
    if head == b"PK\x03\x04":
        if zipfile.is_zipfile(path):
            return None
        return f"truncated: a zip archive without its end, {path.stat().st_size} bytes; an interrupted copy or save?"
    if head[:1] == b"\x80":
        return None
    return "not a PyTorch file; train.py writes checkpoints/last.ckpt and step_*.ckpt"


_TYPE_WORDS = {"Integer": "an integer", "Float": "a number", "bool": "true or false", "String": "a string"}


def _omegaconf_message(e: OmegaConfBaseException, override: str | None = None) -> str:
    """OmegaConf's error as `<key>=<value> is invalid: expected <type>` (wrong type), `<key> is required`, or its first line."""
    key = getattr(e, "full_key", None) or ""
    if isinstance(e, ValidationError) and key:
        match = re.search(r"(?:could not be converted to|is not a valid) (\w+)", str(e))
        expected = _TYPE_WORDS.get(match.group(1), match.group(1)) if match else first_line(e)
        if "is not a ListConfig" in str(e) or "Invalid value assigned" in str(e):
            expected = "a list such as [1,2]"
        if override and "=" in override:  # as typed: `model.channel_mult=[1,x]`, the element named after
            typed, value = override.split("=", 1)
            typed = typed.lstrip("+~")
            expected += f" at {key}" if typed != key else ""
            key = typed
        else:
            value = repr(getattr(e, "value", None))
        return f"{key}={value} is invalid: expected {expected}"
    if isinstance(e, MissingMandatoryValue) and key:
        return f"{key} is required: set it on the command line ({key}=...)"
    line = first_line(e)
    return f"{line} ({key})" if key and key not in line else line


def _hydra_message(e: BaseException) -> str | None:
    """One line for what Hydra raises while composing: an unknown option, an unknown key, a wrong type, bad syntax."""
    from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException

    if isinstance(e, MissingConfigException) and e.missing_cfg_file:
        group, _, option = e.missing_cfg_file.rpartition("/")
        if group and e.options:
            return f"{group}={option}: no such option; available: {', '.join(e.options)}"
        return first_line(e)
    if isinstance(e, OverrideParseException):
        return f"{e.override}: not an override Hydra can parse ({first_line(e)}); the form is key=value"
    if isinstance(e, ConfigCompositionException):
        match = re.search(r"(?:Could not override|Error merging override) '?([^'\s]+)'?", str(e))
        override = match.group(1) if match else None
        cause = e.__cause__ or e.__context__
        if "not in struct" in str(cause) or "not in '" in str(cause):  # from an override, or a key in a YAML file
            key = getattr(cause, "full_key", None) or override or ""
            where = re.match(r"In '([^']+)'", str(e))
            origin = f" (in {where.group(1)}.yaml)" if where else ""
            return f"{key}: no such key{_suggest(key, getattr(cause, 'parent_node', None))}{origin}; `--cfg job` lists the keys"
        if isinstance(cause, OmegaConfBaseException):
            return _omegaconf_message(cause, override)
        return first_line(e)
    return None


def _suggest(key: str, node: Any) -> str:
    """` (did you mean module.lr?)` for a mistyped key, from the keys of `node`, the config node it was looked up in;
    with no close key, how Hydra adds one (`+sampler_options.s_tmax=...`: options without defaults in the YAML)."""
    parent, _, leaf = key.rpartition(".")
    names = [str(k) for k in node.keys()] if OmegaConf.is_dict(node) else []
    close = difflib.get_close_matches(leaf, names, n=1)
    return f" (did you mean {parent + '.' if parent else ''}{close[0]}?)" if close else f" (a new key is added with +{key}=...)"


def _is_misconfiguration(e: BaseException) -> bool:
    """Lightning's MisconfigurationException, without importing Lightning when nothing has."""
    module = sys.modules.get("lightning.fabric.utilities.exceptions")
    return module is not None and isinstance(e, module.MisconfigurationException)


def user_error_message(e: BaseException) -> str | None:
    """One line describing `e` when it (or what it wraps) is a configuration or data error; None for a bug.

    Ours (ConfigError, DataError) name the key themselves; Hydra's composition errors and OmegaConf's get
    the key and value; a ValueError/TypeError raised while Hydra instantiates a config node (a Lightning
    argument, say) is reported with that node's key.
    """
    from hydra.errors import InstantiationException

    node = None
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, ConfigError):  # ddpm.data.DataError included
            return first_line(e)
        hydra_line = _hydra_message(e)
        if hydra_line is not None:
            return hydra_line
        if isinstance(e, OmegaConfBaseException):
            return _omegaconf_message(e)
        if isinstance(e, InstantiationException):
            match = re.search(r"full_key: (\S+)", str(e))
            node = match.group(1) if match else node
        elif _is_misconfiguration(e) or (node and isinstance(e, (ValueError, TypeError))):
            return f"{node}: {first_line(e)}" if node else first_line(e)
        e = e.__cause__ or e.__context__
    return None


def _holds_only(folder: Path, names: set[str]) -> bool:
    try:
        return {p.name for p in folder.iterdir()} <= names
    except OSError:
        return False


_made: set[str] = set()  # absolute folders this process creates: run dirs, sweep dirs and missing folders above them
_sweeps: dict[str, set[str]] = {}  # absolute sweep dir -> the subfolders it held before the sweep began


def note_new_folders(folder: str | os.PathLike, sweep: bool = False) -> None:
    """Record which of `folder` and the folders above it do not exist yet, before anything creates them: the only
    folders remove_if_empty_run may delete (a folder the user made beforehand, even empty, is theirs). `sweep`:
    `folder` is a sweep dir, and a job dir below it is this process's unless it existed already."""
    path = Path(os.path.abspath(folder))
    _made.update(str(p) for p in (path, *path.parents) if not p.exists())
    if sweep:
        _sweeps[str(path)] = {str(p) for p in path.iterdir()} if path.is_dir() else set()


def made_here(folder: str | os.PathLike) -> bool:
    """Whether this process created `folder` (note_new_folders recorded it as missing before the run began)."""
    path = os.path.abspath(folder)
    parent = os.path.dirname(path)
    return path in _made or (parent in _sweeps and path not in _sweeps[parent])


def remove_if_empty_run(run_dir: Path, sweep_job: bool = False) -> None:
    """Delete a run dir that this process created (made_here) and that holds nothing but what Hydra wrote at
    start-up (.hydra/, <job>.log) and this process's lock file (ddpm.runlock, held until exit): no half-made runs.

    Then, unless it is a job of a sweep that goes on (`sweep_job`), the sweep dir above it when it holds only
    Hydra's multirun.yaml (and the sweep's lock file), and the folders above that this process created when they
    are empty (outputs/runs/<date>); never a folder the user made, even an empty one, nor a run dir another live
    process locks (a run refused because the dir is in use never gets here).
    """
    job = HydraConfig.get().job.name if HydraConfig.initialized() else None
    if not made_here(run_dir) or not run_dir.is_dir():
        return
    if not _holds_only(run_dir, {".hydra", f"{job}.log", runlock.LOCK_NAME}) or runlock.held_by_another(run_dir):
        return
    shutil.rmtree(run_dir, ignore_errors=True)
    if sweep_job:  # the sweep goes on, and its dir keeps the failed job's record
        return
    parent = run_dir.parent
    if made_here(parent) and (parent / "multirun.yaml").is_file() and _holds_only(parent, {"multirun.yaml", runlock.LOCK_NAME}):
        shutil.rmtree(parent, ignore_errors=True)
        parent = parent.parent
    while made_here(parent):  # e.g. outputs/runs/<date>, when this was its only run
        try:
            parent.rmdir()
        except OSError:  # not empty: another run's
            break
        parent = parent.parent


def _full_error() -> bool:
    """True when the user asked for tracebacks (HYDRA_FULL_ERROR=1 set by them, not by run_cli)."""
    return os.environ.get("HYDRA_FULL_ERROR") == "1" and os.environ.get(_ONE_LINE) != "1"


def run_cli(main: Callable[[], Any]) -> None:
    """Run a `@hydra.main` entry point so that a bad config ends in one `error:` line and exit status 2.

    Hydra prints its own multi-line report (or a traceback) for errors raised while it composes the config
    (an unknown option or key, a wrong type, bad syntax); with HYDRA_FULL_ERROR=1 it raises them instead, and
    this turns them into one line.
    Bugs still show their traceback; so does everything when the user sets HYDRA_FULL_ERROR=1.
    """
    if _full_error():
        main()
        return
    os.environ.update({"HYDRA_FULL_ERROR": "1", _ONE_LINE: "1"})  # inherited by DDP ranks, which then behave alike
    try:
        main()
    except Exception as e:
        message = user_error_message(e)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


class JobFailed(ConfigError):
    """A job of a `-m` sweep ended on a configuration or data error (`reason`). Hydra records the job as failed and
    runs the sweep's other jobs; at the end it raises the first failure, which run_cli reports in one line (exit
    status 2). Optuna's sweeper records it as a failed trial and goes on."""

    def __init__(self, job: int, reason: str) -> None:
        super().__init__(f"job {job} of the sweep failed: {reason} (every job: the sweep dir's summary.md)")
        self.reason = reason


def job_number() -> int | None:
    """The job number inside a `-m` sweep's job; None in a single run."""
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get().job.num if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN else None


@contextlib.contextmanager
def clean_errors(run_dir: str | os.PathLike | None = None, job: int | None = None) -> Iterator[None]:
    """Turn configuration and data errors into `error: <message>` on stderr and exit status 2.

    `run_dir`: removed on such an error when it holds only Hydra's start-up files. `job`: the job number in a
    `-m` sweep, where the error is printed as `job <n> failed: <message>` and raised as JobFailed, so the sweep goes
    on. Bugs keep their traceback, and so does everything when HYDRA_FULL_ERROR=1.
    """
    try:
        yield
    except Exception as e:
        message = user_error_message(e)
        if message is None or _full_error():
            raise
        if run_dir is not None:
            remove_if_empty_run(Path(run_dir), sweep_job=job is not None)
        if job is not None:
            print(f"job {job} failed: {message}", file=sys.stderr)
            raise JobFailed(job, message) from None
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def print_config_tree(cfg: DictConfig, first: tuple[str, ...] = ("data", "model", "schedule", "module", "trainer", "callbacks", "logger")) -> None:
    """The composed config as a rich tree on stdout: the groups in `first`, then the other keys, each resolved."""
    from rich import print as rich_print
    from rich.syntax import Syntax
    from rich.tree import Tree

    tree = Tree("config", guide_style="dim")
    keys = [k for k in first if k in cfg] + [k for k in cfg if k not in first]
    for key in keys:
        value = cfg[key]
        text = OmegaConf.to_yaml(value, resolve=True) if OmegaConf.is_config(value) else str(value)
        tree.add(key).add(Syntax(text.rstrip(), "yaml", theme="ansi_dark", background_color="default"))
    rich_print(tree)


def check_train_run(cfg: DictConfig) -> None:
    """check_train, then whether the data's files are where data.root says (their content is read at setup)."""
    check_train(cfg)
    if cfg.data.get("dataset") in ("folder", "cifar10"):
        from ddpm.data import check_data_source  # here, not above: Lightning loads only for a run that needs it

        check_data_source(cfg.data.dataset, cfg.data.get("root"))


def check_sample_run(cfg: DictConfig) -> None:
    """check_sample, then whether `ckpt` names a checkpoint file (or a run dir with one) that is not cut short, and
    whether out_dir holds an earlier sampling (keep_earlier_samples)."""
    check_sample(cfg)
    reason = unreadable_checkpoint(resolve_ckpt(cfg.ckpt, key="ckpt"))
    if reason:
        raise ConfigError(f"ckpt={cfg.ckpt}: not a readable checkpoint ({reason})")
    keep_earlier_samples(cfg)


def keep_earlier_samples(cfg: DictConfig) -> None:
    """Never replace an earlier sampling's files unasked: refuse a sample.py run whose out_dir (or Hydra run dir)
    holds samples.npz, grid.png or metrics.json, unless overwrite=true, which replaces the ones this run writes.
    Scoring a file (samples=) writes only grid.png and metrics.json and never touches a samples.npz: scoring the
    samples.npz of out_dir itself is refused only when an earlier grid.png or metrics.json lies beside it."""
    from ddpm.drawing import GRID_FILE, METRICS_FILE, SAMPLES_FILE

    if cfg.get("overwrite"):
        return
    if cfg.get("out_dir"):
        out_dir, key = cfg.out_dir, "out_dir"
    elif "hydra" in cfg:  # the Validate callback's config
        out_dir, key = cfg.hydra.run.dir, "hydra.run.dir"
    elif HydraConfig.initialized():
        out_dir, key = HydraConfig.get().runtime.output_dir, "hydra.run.dir"
    else:
        return
    written = (GRID_FILE, METRICS_FILE) if cfg.get("samples") else (SAMPLES_FILE, GRID_FILE, METRICS_FILE)
    found = [name for name in written if (Path(out_dir) / name).exists()]
    if found:
        raise ConfigError(f"{key}={out_dir} holds {', '.join(found)} of an earlier sampling: replace {'them' if len(found) > 1 else 'it'} "
                          f"with overwrite=true, or choose another out_dir=")  # fmt: skip


def run_marks(folder: Path, job: str = "train") -> list[str]:
    """What in `folder` shows that it holds a run: any of checkpoints/, run.json, .hydra/, logs/, samples/, wandb/ and
    <job>.log (what train.py, Hydra and the loggers write into a run dir), as `name/` for a folder; [] for a folder
    that is absent, empty or holds only other files (one the user made for the run, a stale lock file)."""
    names = ["checkpoints/", RECORD, ".hydra/", "logs/", "samples/", "wandb/", f"{job}.log"]
    return [name for name in names if (folder / name.rstrip("/")).exists()]


def _aside(folder: Path) -> Path:
    """A free name beside `folder` for the run it holds: <folder>.<YYYYmmdd-HHMMSS>, then -2, -3, ... when taken."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside, n = folder.with_name(f"{folder.name}.{stamp}"), 1
    while aside.exists():
        n += 1
        aside = folder.with_name(f"{folder.name}.{stamp}-{n}")
    return aside


def keep_earlier_run(folder: str | os.PathLike, *, resume: bool, overwrite: bool, job: str = "train", sweep: bool = False) -> None:
    """Never train over a run the user keeps: a new run aimed at a dir that holds one (run_marks) is refused with a
    ConfigError naming the dir and the choices, before anything is written; resume=true continues it; overwrite=true
    moves the dir aside whole (_aside: renamed, never deleted; the caller has checked that no live process holds it)
    and prints where it went. For a sweep (`sweep`), `folder` is the sweep dir and it holds runs when one of its job
    dirs does (an earlier sweep of the same name): the sweep is refused, or moved aside, as a whole, before Hydra
    writes any job's files."""
    folder = Path(folder)
    if sweep:
        jobs = sorted(p for p in folder.iterdir() if p.is_dir() and run_marks(p, job)) if folder.is_dir() else []
        marks = [f"{p.name}/" for p in jobs]
    else:
        marks = run_marks(folder, job)
    if not marks or resume or not runlock.is_global_rank_zero():  # a DDP rank's re-launch finds rank 0's run there
        return
    what, key = ("the runs of an earlier sweep", "hydra.sweep.dir") if sweep else ("a run", "hydra.run.dir")
    if not overwrite:
        shown = ", ".join(marks[:3] + (["..."] if len(marks) > 3 else []))
        raise ConfigError(f"{folder} holds {what} ({shown}); continue {'them' if sweep else 'it'} with resume=true, start afresh with overwrite=true "
                          f"(the earlier {'sweep' if sweep else 'run'} is moved to {folder}.<time>, never deleted), or choose another name= or {key}=")  # fmt: skip
    aside = _aside(folder)
    try:
        folder.rename(aside)
    except OSError as e:
        raise ConfigError(f"overwrite=true: cannot move {folder} aside to {aside} ({e.strerror}); move it yourself or choose another name=") from e
    print(f"overwrite=true: the earlier {'sweep' if sweep else 'run'} in {folder} is now in {aside}", file=sys.stderr)


class Validate(Callback):
    """Hydra callback: check the composed config before Hydra writes anything (`hydra.callbacks.validate` in the YAML).

    A single run is checked before its run dir exists; each job of a sweep (`-m module.lr=1e-3,-1`) by the task
    when it starts (a refused job is failed, its job dir removed, and the sweep goes on). Hydra turns an exception raised by a callback into a warning
    and carries on, so a bad value ends the process here (clean_errors: one line, exit status 2).
    `check`: "train" or "sample".

    It also locks the run dir (ddpm.runlock; sample.py's is its out_dir) before Hydra writes into it: a second run
    aimed at a dir in use is refused in one line. It records which folders did not exist yet (note_new_folders): a
    run that fails removes only those. A sweep locks its sweep dir at the start and each job its own job dir. A new run
    (or sweep) aimed at a dir that holds one is refused, or moved aside with overwrite=true (keep_earlier_run).
    """

    def __init__(self, check: str) -> None:
        self.check = {"train": check_train_run, "sample": check_sample_run}[check]
        self.lock = check == "train"  # train.py's run dir with its checks, and its sweeps; sample.py locks its out_dir alone

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        with clean_errors():
            self.check(config)
            if self.lock:  # a refusal writes nothing and removes nothing: the dir is another run's
                resume = bool(config.get("resume"))
                runlock.check_free(config.hydra.run.dir, resume=resume)
                keep_earlier_run(config.hydra.run.dir, resume=resume, overwrite=bool(config.get("overwrite")), job=config.hydra.job.name)
                note_new_folders(config.hydra.run.dir)
                runlock.acquire(config.hydra.run.dir, resume=resume)
            else:  # sample.py: its out_dir is its run dir, locked the same way (check_sample_run has refused replacing files there)
                note_new_folders(config.hydra.run.dir)
                runlock.acquire(config.hydra.run.dir, elsewhere="out_dir=")

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        runlock.release(config.hydra.run.dir)  # train.py's and sample.py's

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if self.lock:
            with clean_errors():
                runlock.check_free(config.hydra.sweep.dir, below=True, sweep=True)
                # unchecked values here (the jobs check theirs): only a true moves anything
                keep_earlier_run(config.hydra.sweep.dir, resume=config.get("resume") is True, overwrite=config.get("overwrite") is True,
                                 job=config.hydra.job.name, sweep=True)  # fmt: skip
                note_new_folders(config.hydra.sweep.dir, sweep=True)
                runlock.acquire(config.hydra.sweep.dir, sweep=True)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.lock:
            runlock.release(config.hydra.sweep.dir)

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        """In a sweep each job locks its own dir (the sweep dir above is this sweep's); its values are checked by
        the task itself (train.py, sample.py), where a refusal fails that job and not the sweep."""
        if config.hydra.mode == RunMode.MULTIRUN and self.lock:  # first: a refusal removes nothing
            with clean_errors():
                runlock.acquire(config.hydra.runtime.output_dir, resume=bool(config.get("resume")))

    def on_job_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.lock and config.hydra.mode == RunMode.MULTIRUN:
            runlock.release(config.hydra.runtime.output_dir)
