"""The ``daskadmm`` command: a Hydra app over the config groups in ``conf/``.

    daskadmm algorithm=radmm3 model.depth=8 data=wine_red run.iterations=100
    daskadmm -m algorithm=radmm3,pdadmm model.depth=4,8,16
    daskadmm experiment=digits_radmm3

This is the only module that imports Hydra. The composed config is turned into the typed
:class:`daskadmm.config.Config` and handed to :func:`daskadmm.api.fit`.

Bad input (a bad value, an unknown key or config, an unreadable data set) must end in ONE line on
stderr (``daskadmm: error: ...``), exit code 2, no traceback, and nothing written. Hydra creates the
run directory (``.hydra/``, the job log) *before* it calls the task function, so checking inside
the task function is too late. Therefore :func:`main` runs a **pre-flight** before it hands control
to Hydra: it parses the command line with Hydra's own argument parser, composes the config of every
job with Hydra's public compose API (for ``-m``, the jobs are expanded exactly like the basic
sweeper does: ``hydra.sweeper.params`` from the config, then the command-line overrides, as a
cartesian product), validates each with :func:`daskadmm.config.from_mapping` and loads each distinct
data set with :func:`daskadmm.api.load_data`. Only when all of that succeeded does Hydra run. The
data sets loaded in the pre-flight are kept (within a memory budget) and reused by the jobs.

The task function validates again (cheap); should it still fail, it removes the run directory if
it holds nothing but what Hydra created for this run, then exits the same way.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import logging
import os
import shutil
import sys
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn, cast

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .config import AlgorithmConfig, Config, from_mapping
from .errors import ClusterError, ConfigError, DataError, StoreError, UsageError, one_line
from .monitor import FAILED

__all__ = ["CONFIG_MODULE", "CONFIG_NAME", "SCHEMA_NAME", "main", "register_schema"]

PROG = "daskadmm"
# The configs ship as the package ``daskadmm.conf`` (top-level ``conf/`` mapped by
# pyproject's package-dir): ``pkg://`` finds them through the import system, the same way for a
# wheel install and an editable install (verified for both), from any working directory.
CONFIG_MODULE = "daskadmm.conf"
CONFIG_PATH = f"pkg://{CONFIG_MODULE}"
CONFIG_NAME = "config"
# The schema node first in conf/config.yaml's defaults list: every key with its default, taken
# from the dataclasses of daskadmm/config.py (the one place a default is written down).
SCHEMA_NAME = "base_config"

# Data sets loaded by the pre-flight and reused by the jobs (key: _data_key), within this budget.
_PRELOAD_BUDGET_BYTES = 512 * 2**20
_PRELOADED: dict[str, Any] = {}
# (n_train, n_test, d_in, d_out) of each data set, by data key (filled by _preflight)
_SHAPES: dict[str, tuple[int, int, int, int]] = {}

# Hydra flags that do not run a job and create nothing: no pre-flight for those.
_NON_RUN_FLAGS = ("help", "hydra_help", "cfg", "info", "shell_completion", "experimental_rerun")


# Exit codes: 0 the run finished (converged or max_iter); 2 bad input, an unusable store or a
# cluster failure (one line on stderr); 3 the run failed (diverged or nonfinite: its outputs are
# written, and the model kept is that of its last good evaluation; stalled: it did not learn,
# its outputs and final model are written); 130 interrupted
# (Ctrl-C: the run stopped at its next evaluation and wrote its outputs).
EXIT_FAILED_RUN = 3
EXIT_INTERRUPTED = 130  # Ctrl-C: the run stopped at its next evaluation and wrote its outputs


@contextlib.contextmanager
def _graceful_interrupt() -> Iterator[None]:
    """The first Ctrl-C asks the run to stop at its next evaluation (it then writes its
    outputs, status ``interrupted``); a second one aborts at once."""
    import signal

    from .monitor import clear_stop, request_stop

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        request_stop()
        signal.signal(signal.SIGINT, signal.default_int_handler)
        os.write(2, f"\n{PROG}: stopping at the next evaluation (Ctrl-C again to abort)\n"
                 .encode())

    previous = signal.signal(signal.SIGINT, handler)
    clear_stop()
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        clear_stop()


def _job_label(job: list[str]) -> str:
    task = [o for o in job if not o.startswith(("hydra.", "hydra/", "+hydra", "~hydra"))]
    return f" (job: {' '.join(task) or 'defaults'})"


def _fail(message: str) -> NoReturn:
    sys.stderr.write(f"{PROG}: error: {message}\n")
    sys.stderr.flush()
    raise SystemExit(2)


def _data_key(cfg: Config) -> str:
    """What the data split depends on: the data section and the split seed."""
    data = dict(cfg.to_dict()["data"])
    if data.get("seed") is None:
        data["seed"] = cfg.run.seed
    return json.dumps(data, sort_keys=True, default=str)


def _dataset_bytes(dataset: Any) -> int:
    total = 0
    for value in vars(dataset).values() if hasattr(dataset, "__dict__") else ():
        total += int(getattr(value, "nbytes", 0) or 0)
    return total


# ---------------------------------------------------------------------------------------- schema


def register_schema() -> None:
    """Store the schema in Hydra's ConfigStore as ``base_config``: the whole :class:`Config`
    with every default, which conf/config.yaml composes first, so the group files
    (conf/algorithm/*.yaml, ...) list only what differs from it.

    The node is a plain mapping, not the dataclass: a structured (typed) node would have
    OmegaConf refuse ``model.depth=abc`` with its own multi-line message before
    :func:`daskadmm.config.from_mapping` gives its one-line one naming the key. Unknown keys are
    still refused at composition (Hydra puts the config in struct mode). Importing
    ``daskadmm.conf`` (which Hydra does to read the configs) calls this, so the config
    package composes through Hydra's compose API too, without the CLI.
    """
    node = Config().to_dict()
    # the schema's algorithm defaults, not the default algorithm's overrides: every
    # conf/algorithm/<name>.yaml adds its own (the default's included)
    node["algorithm"] = dataclasses.asdict(AlgorithmConfig())
    ConfigStore.instance().store(name=SCHEMA_NAME, node=node)


register_schema()


# -------------------------------------------------------------------------------------- pre-flight


@contextlib.contextmanager
def _hydra_context(args: Any) -> Iterator[None]:
    """Initialise Hydra's compose API on the same config source ``hydra.main`` will use."""
    from hydra import initialize_config_dir, initialize_config_module

    GlobalHydra.instance().clear()
    config_path = args.config_path
    if config_path is None:
        ctx: contextlib.AbstractContextManager[Any] = initialize_config_module(
            CONFIG_MODULE, version_base=None)
    elif config_path.startswith("pkg://"):
        ctx = initialize_config_module(config_path[len("pkg://"):], version_base=None)
    else:  # hydra.main resolves a relative --config-path against the file declaring it
        base = Path(__file__).resolve().parent
        ctx = initialize_config_dir(str((base / config_path).resolve()), version_base=None)
    try:
        with ctx:
            yield
    finally:
        GlobalHydra.instance().clear()


def _job_overrides(args: Any, config_name: str) -> list[list[str]]:
    """The override list of every job Hydra will run (one list for a single run)."""
    from hydra import compose
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = list(args.overrides)
    if args.config_dir is not None:
        config_dir = Path(args.config_dir).resolve()
        if not config_dir.is_dir():
            raise UsageError(f"additional config directory '{config_dir}' not found")
        overrides = [f"hydra.searchpath=['file://{config_dir}']", *overrides]

    loader = GlobalHydra.instance().config_loader()
    parser = OverridesParser.create(config_loader=loader)
    parsed = []
    for line in overrides:  # one at a time, so that a syntax error names its override
        try:
            parsed += parser.parse_overrides([line])
        except HydraException as exc:
            raise UsageError(f"cannot parse override '{line}': {one_line(exc)}") from None
    plain = [_text(o) for o in parsed if not o.is_sweep_override()]
    base = compose(config_name, plain, return_hydra_config=True)
    mode = OmegaConf.select(base, "hydra.mode")
    multirun = bool(args.multirun) or str(mode).endswith("MULTIRUN")
    if not multirun:
        # A sweep override in a single run is an error that compose reports ("Ambiguous value").
        return [overrides]

    hydra_plain = [_text(o) for o in parsed if o.is_hydra_override()
                   and not o.is_sweep_override()]
    task = [_text(o) for o in parsed if not o.is_hydra_override()]
    sweeper = OmegaConf.select(base, "hydra.sweeper._target_") or ""
    if not sweeper.endswith("BasicSweeper"):
        # Another sweeper (optuna, ...) samples the values itself: check what is fixed.
        return [hydra_plain + [_text(o) for o in parsed
                               if not o.is_hydra_override() and not o.is_sweep_override()]]
    params = OmegaConf.select(base, "hydra.sweeper.params") or {}
    arguments = [f"{k}={v}" for k, v in params.items()] + task
    try:
        jobs = _expand_sweeps(parser.parse_overrides(arguments))
    except HydraException as exc:
        raise UsageError(one_line(exc)) from None
    return [hydra_plain + job for job in jobs]


def _expand_sweeps(overrides: list[Any]) -> list[list[str]]:
    """The jobs of Hydra's basic sweeper: the cartesian product of every key's values, in
    the order the keys first appear (a later override of a key replaces an earlier one), the
    first key varying slowest. Discrete sweeps only (``a=1,2``, ``choice``, ``range``, ``glob``
    of config groups), as that sweeper; an interval sweep is an error."""
    values: dict[str, list[str]] = {}
    for o in overrides:
        key = o.get_key_element()
        if not o.is_sweep_override():
            values[key] = [f"{key}={o.get_value_element_as_str()}"]
        elif o.is_discrete_sweep():
            values[key] = [f"{key}={v}" for v in o.sweep_string_iterator()]
        else:
            raise UsageError(f"'{_text(o)}': the basic sweeper sweeps lists, choice, range "
                             "and glob only, not intervals")
    return [list(job) for job in itertools.product(*values.values())]


def _text(override: Any) -> str:
    """The command-line text of a parsed override (set for every override parsed from text)."""
    line = override.input_line
    assert line is not None
    return line


def _plain(cfg: DictConfig) -> dict[str, Any]:
    """A composed config as plain Python values, without Hydra's own section."""
    container = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(container, dict)
    return {str(k): v for k, v in container.items() if k != "hydra"}


def _compose_config(config_name: str, overrides: list[str]) -> Config:
    from hydra import compose

    cfg = compose(config_name, overrides)
    return from_mapping(_plain(cfg))


def _preflight(args: Any) -> list[Config]:
    """Compose and validate every job's config and load every distinct data set, writing
    nothing; raise :class:`UsageError` with a one-line message on the first problem. Returns
    the jobs' configs."""
    config_name = args.config_name or CONFIG_NAME
    configs: list[tuple[list[str], Config]] = []
    try:
        with warnings.catch_warnings(), _hydra_context(args):
            warnings.simplefilter("ignore")
            jobs = _job_overrides(args, config_name)
            run_dirs = _run_dirs(args, config_name, jobs)
            for job in jobs:
                try:
                    configs.append((job, _compose_config(config_name, job)))
                except ConfigError as exc:
                    where = _job_label(job) if len(jobs) > 1 else ""
                    raise UsageError(one_line(exc) + where) from None
    except (ConfigError, HydraException, OmegaConfBaseException, ValueError) as exc:
        raise UsageError(one_line(exc)) from None

    from . import api
    from .config import check_resources

    _PRELOADED.clear()
    _SHAPES.clear()
    budget = _PRELOAD_BUDGET_BYTES
    for job, cfg in configs:
        key = _data_key(cfg)
        where = _job_label(job) if len(configs) > 1 else ""
        if key not in _SHAPES:
            try:
                dataset = api.load_data(cfg)
            except (DataError, OSError) as exc:
                raise UsageError(one_line(exc) + where) from None
            _SHAPES[key] = (dataset.X_train.shape[1], dataset.X_test.shape[1], dataset.d_in,
                            dataset.d_out)
            size = _dataset_bytes(dataset)
            if size <= budget:
                _PRELOADED[key] = dataset
                budget -= size
        try:
            check_resources(cfg, *_SHAPES[key])
        except ConfigError as exc:
            raise UsageError(one_line(exc) + where) from None
    for (_, cfg), job_dir in zip(configs, run_dirs, strict=True):
        if job_dir is not None:
            _check_run_dir(cfg, *job_dir)
    return [cfg for _, cfg in configs]


def _run_dirs(args: Any, config_name: str, jobs: list[list[str]]
              ) -> list[tuple[Path, str] | None]:
    """Each job's run directory as Hydra will make it (absolute), with the key that sets it:
    a single run's ``hydra.run.dir``, a sweep job's ``hydra.sweep.dir/<subdir>`` (its
    ``hydra.job.num`` set as the launcher will). None for a job whose directory cannot be
    resolved here (each job checks its own directory again when it starts)."""
    from hydra import compose

    out: list[tuple[Path, str] | None] = []
    for num, job in enumerate(jobs):
        try:
            cfg = compose(config_name, job, return_hydra_config=True)
            multirun = bool(args.multirun) or str(OmegaConf.select(cfg, "hydra.mode")).endswith(
                "MULTIRUN")
            if multirun:
                OmegaConf.update(cfg, "hydra.job.num", num)
            HydraConfig.instance().set_config(cfg)  # for ${hydra:...} in the directories
            if multirun:
                where = Path(str(OmegaConf.select(cfg, "hydra.sweep.dir")),
                             str(OmegaConf.select(cfg, "hydra.sweep.subdir")))
            else:
                where = Path(str(OmegaConf.select(cfg, "hydra.run.dir")))
        except Exception:  # noqa: BLE001 (the job checks its directory when it starts)
            out.append(None)
            continue
        finally:
            HydraConfig.instance().cfg = None
        out.append((Path(os.path.abspath(where)),
                    "hydra.sweep.dir" if multirun else "hydra.run.dir"))
    return out


def _written(started: bool) -> str:
    """What a refusal has changed: nothing, or (``started``: inside the job) Hydra's files."""
    return ("Hydra has written its .hydra/ there, nothing else was changed" if started
            else "nothing was changed")


def _lock_run_dir(run_dir: Path, *, hold: bool) -> int | None:
    """An exclusive ``flock`` on the run directory itself (no file is created), so that two
    runs never share one: ``hold`` (inside the job): take it and return the descriptor, which
    the run keeps open until it ends; otherwise only test that no run holds it (None). Raises
    :class:`UsageError` while another daskadmm run holds it."""
    import fcntl

    try:
        fd = os.open(run_dir, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return None  # not there (yet), or not a directory: the other checks say so
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise UsageError(f"run directory {run_dir} is in use by another daskadmm run: choose "
                         f"another run directory ({_written(hold)})") from None
    if hold:
        return fd
    os.close(fd)  # (closing the descriptor releases the lock)
    return None


def _check_run_dir(cfg: Config, run_dir: Path, key: str = "hydra.run.dir",
                   started: bool = False) -> list[str]:
    """Refuse a run directory that already holds a run's outputs (``hydra.run.dir`` given
    twice, or two runs started in the same second): this run would replace them. Allowed with
    ``storage.overwrite=true`` (the run then replaces them: :func:`_clear_outputs`), and for a
    resumed run whose store lies in that directory (its outputs start with the stored
    history): the rule of :func:`~daskadmm.outputs.outputs_in_the_way`, which the Python API
    applies too. ``started``: Hydra has already written its ``.hydra/`` there. Returns the
    outputs found; raises :class:`UsageError`."""
    from .outputs import outputs_in_the_way, previous_outputs

    for where in (run_dir, *run_dir.parents):
        if where.exists() or where.is_symlink():
            if not where.is_dir():
                what = "is a file" if where == run_dir else f"is below a file, {where}"
                raise UsageError(f"run directory {run_dir} {what}: choose another {key}")
            break
    if not started:
        _lock_run_dir(run_dir, hold=False)  # (a running job holds its own)
    found = previous_outputs(run_dir)
    refused = outputs_in_the_way(run_dir, resume=cfg.run.resume, url=cfg.storage.url,
                                 overwrite=cfg.storage.overwrite)
    if refused:
        advice = (f"choose another {key} (a resumed run writes its outputs into a run "
                  "directory of its own)" if cfg.run.resume else
                  f"choose another {key}, or replace them with storage.overwrite=true")
        raise UsageError(f"run directory {run_dir} already holds a run's outputs "
                         f"({', '.join(refused)}): {advice} ({_written(started)})")
    if found and cfg.storage.overwrite:
        _check_replaceable(run_dir, found)
    elif found:  # a resume of the store inside: it writes its outputs over these
        links = [name for name in found if (run_dir / name).is_symlink()]
        if links:
            raise UsageError(f"run directory {run_dir}: {', '.join(links)} is a symbolic link, "
                             "which the resumed run would write through: remove it first")
    return found


def _check_replaceable(run_dir: Path, found: list[str]) -> None:
    """What ``storage.overwrite=true`` may remove of ``found``: a store must be a daskadmm
    store that holds no file daskadmm did not write and that no live run holds
    (:meth:`~daskadmm.storage.StateStore.check_new`); a file's name must be a file (or a
    symbolic link, removed as such). Raises :class:`UsageError` naming the output."""
    from .outputs import RUN_STORES
    from .storage import StateStore

    for name in found:
        path = run_dir / name
        if path.is_symlink():
            continue
        if name in RUN_STORES:
            try:
                StateStore.check_new(str(path), overwrite=True)
            except StoreError as exc:
                raise UsageError(f"storage.overwrite=true cannot replace {name} in run "
                                 f"directory {run_dir}: {one_line(exc)}") from None
        elif not path.is_file():
            raise UsageError(f"storage.overwrite=true cannot replace {name} in run directory "
                             f"{run_dir}: it is not a file (nothing was changed)")


def _clear_outputs(cfg: Config, run_dir: Path, found: list[str]) -> None:
    """``storage.overwrite=true`` on a run directory holding an earlier run's outputs: remove
    them, so that none of them (a plot this run does not draw, a model store it does not
    write) is left beside this run's; symbolic links are removed as links. Checked first as
    :func:`_check_replaceable` (raises :class:`UsageError` before removing anything); the
    run's own store is left to the run, which replaces it."""
    from .outputs import store_inside

    _check_replaceable(run_dir, found)
    own = store_inside(cfg.storage.url, run_dir)
    for p in (run_dir / name for name in found):
        if p.is_symlink() or not p.is_dir():
            p.unlink()
        elif Path(os.path.realpath(p)) != own:
            shutil.rmtree(p)


def _check_stores(configs: list[Config]) -> None:
    """Refuse, before anything is written, a ``storage.url`` a job may not use (see
    :func:`daskadmm.engines.driver.preflight_store`), and one store shared by several jobs."""
    from . import api
    from .engines.driver import preflight_store

    seen: dict[str, int] = {}
    for num, cfg in enumerate(configs):
        url = cfg.storage.url
        if url:
            if url in seen:
                raise UsageError(f"jobs {seen[url]} and {num} of the sweep both use "
                                 f"storage.url={url}: give each job its own store")
            seen[url] = num
        try:
            preflight_store(api.engine_options(cfg))
        except StoreError as exc:
            raise UsageError(one_line(exc)) from None


def _shared_cluster(args: Any, configs: list[Config]):
    """A multirun whose jobs use ``cluster=local`` shares one LocalCluster (started here, once,
    with the first such job's settings) instead of starting one per job; jobs that run in
    process (small ADMM problems, see :func:`daskadmm.engines.cluster.in_process_reason`) or need no
    cluster (the backprop baselines) do not count."""
    from . import api
    from .config import ADMM_ALGORITHMS, state_bytes
    from .engines.cluster import SharedCluster, in_process_reason

    local = [c.cluster for c in configs if c.cluster.kind == "local"
             and c.algorithm.name in ADMM_ALGORITHMS  # the baselines use no cluster
             and in_process_reason(api.engine_options(c),
                                   state_bytes(c, _SHAPES[_data_key(c)][0])) is None]
    if not getattr(args, "multirun", False) or len(local) < 2:
        return contextlib.nullcontext()
    return SharedCluster(local[0])


# ------------------------------------------------------------------------------------- the task


def _pristine_run_dir(run_dir: Path, started: float) -> bool:
    """True if ``run_dir`` holds only what Hydra created for this run (``.hydra/``, ``*.log``),
    all of it modified after ``started``."""
    if not run_dir.is_dir():
        return False
    for entry in run_dir.iterdir():
        if entry.name == ".hydra" and entry.is_dir():
            files = list(entry.iterdir())
            if any(not f.is_file() or f.stat().st_mtime < started - 1 for f in files):
                return False
        elif entry.is_file() and entry.suffix == ".log":
            if entry.stat().st_mtime < started - 1:
                return False
        else:
            return False
    return True


def _remove_if_pristine(run_dir: Path, started: float) -> None:
    if _pristine_run_dir(run_dir, started):
        logging.shutdown()  # close the job log Hydra opened in there
        shutil.rmtree(run_dir, ignore_errors=True)


_STARTED = time.time()
_RUN_DIR_LOCKS: list[int | None] = []  # the run directories' locks this process holds


def _format(value: Any) -> str:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return "-"
    return f"{v:.4g}"


def _progress(cfg: Config, metric: str) -> tuple[Any, Any]:
    from tqdm.auto import tqdm

    bar = tqdm(
        total=cfg.run.iterations,
        desc=cfg.algorithm.name,
        unit="it",
        file=sys.stderr,
        mininterval=0.5,
        dynamic_ncols=True,
        disable=not cfg.run.progress,
    )

    def update(record: dict[str, Any]) -> None:
        try:
            it = int(record.get("iteration", bar.n))
        except (TypeError, ValueError):
            it = bar.n
        # the record's metrics first, then the count: the redraw shows this iteration's values
        bar.set_postfix_str(
            f"obj={_format(record.get('objective'))}, "
            f"res={_format(record.get('primal_residual'))}, "
            f"test_{metric}={_format(record.get('test_metric'))}",
            refresh=False,
        )
        if it > bar.n:
            bar.update(min(it, cfg.run.iterations) - bar.n)

    return bar, update


# Libraries whose log records (and Python warnings) belong in the job log, not the terminal:
# distributed's cluster chatter (a busy dashboard port, slow event loops), the dashboard's
# tracebacks (Bokeh, Tornado), dask's own.
_LIBRARY_LOGGERS = ("distributed", "dask", "bokeh", "tornado", "py.warnings")


def _library_logs_to_job_log() -> None:
    """Send library log records and Python warnings of this process to the job log
    (``<run dir>/daskadmm.log``, the file Hydra opened) instead of the terminal. daskadmm's own
    messages still reach the terminal. Worker processes keep their own stderr."""
    files = [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]
    if not files:
        return  # no job log (hydra.job_logging disabled): leave the terminal as it is
    logging.captureWarnings(True)
    for name in _LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if not isinstance(handler, logging.FileHandler):
                logger.removeHandler(handler)
        for handler in files:
            if handler not in logger.handlers:
                logger.addHandler(handler)
        logger.propagate = False


def _to_job_log(level: int, message: str) -> None:
    """Write one of daskadmm's own terminal lines into the job log too (the file Hydra opened;
    not the console handler: the terminal has it already)."""
    record = logging.LogRecord("daskadmm", level, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def _say_and_log(message: str, level: int) -> None:
    sys.stderr.write(message + "\n")
    sys.stderr.flush()
    _to_job_log(level, message)


def _summary_line(cfg: Config, result: Any, run_dir: Path) -> str:
    final = result.final
    return (
        f"{PROG}: {cfg.algorithm.name} {result.status} after {result.iterations} iterations: "
        f"train {result.metric} {_format(final.get('train_metric'))}, "
        f"test {result.metric} {_format(final.get('test_metric'))}, "
        f"{result.wall_time:.1f} s -> {run_dir}"
    )


def _take_dataset(cfg: Config) -> Any:
    return _PRELOADED.get(_data_key(cfg))


def _task(dcfg: DictConfig) -> None:
    from . import api
    from .outputs import METRICS_FILE, MetricsWriter, write_run_outputs

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    try:  # held until the process ends: no other run may use this directory meanwhile
        _RUN_DIR_LOCKS.append(_lock_run_dir(run_dir, hold=True))
    except UsageError as exc:
        _fail(str(exc))
    try:
        cfg = from_mapping(_plain(dcfg))
        dataset = _take_dataset(cfg)
        if dataset is None:
            dataset = api.load_data(cfg)
    except (ConfigError, OmegaConfBaseException, DataError, OSError) as exc:
        _remove_if_pristine(run_dir, _STARTED)
        _fail(one_line(exc))

    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    if cfg.cluster.kind in ("local", "address"):
        from .engines.cluster import set_up_library_logging

        set_up_library_logging()  # distributed's loggers exist now; redirected next
    _library_logs_to_job_log()
    try:  # again: a directory the pre-flight could not resolve, or made since
        found = _check_run_dir(cfg, run_dir, "hydra.sweep.dir" if str(hc.mode).endswith(
            "MULTIRUN") else "hydra.run.dir", started=True)
        if found and cfg.storage.overwrite:
            _clear_outputs(cfg, run_dir, found)
    except UsageError as exc:
        _fail(str(exc))
    metric = "accuracy" if getattr(dataset, "task", None) == "classification" else "mse"
    bar, update = _progress(cfg, metric)
    writer = MetricsWriter(run_dir / METRICS_FILE, lazy=True)  # created with its first row

    def callback(record: dict[str, Any]) -> None:
        writer.write(record)
        update(record)

    try:
        with _graceful_interrupt():
            result = api.fit(cfg, run_dir=run_dir, callback=callback, dataset=dataset)
    except ClusterError as exc:
        # mid-run: keep what was written (metrics so far, the store and its checkpoints)
        writer.close()
        bar.close()
        _fail(one_line(exc))
    except (StoreError, ConnectionError, ImportError, OSError) as exc:
        # bad store paths, an unreachable cluster.address, a missing optional extra, a full
        # or read-only disk. Nothing of a previous run is touched; the metrics of a run that
        # got going are kept.
        ran = writer.rows > 0
        writer.close()
        bar.close()
        if not ran:  # (the writer created nothing: a metrics.csv there is not this run's)
            _remove_if_pristine(run_dir, _STARTED)
        _fail(one_line(exc, with_type=isinstance(exc, OSError)
                       and not isinstance(exc, ConnectionError)))
    finally:
        writer.close()
        bar.close()
    extra = {
        "run_dir": str(run_dir),
        "overrides": list(hc.overrides.task),
        # a single run has no job number (MISSING): select gives None
        "job": {"name": hc.job.name, "num": OmegaConf.select(cast(DictConfig, hc.job), "num")},
    }
    if result.info.get("engine_note"):  # said on the terminal when the choice was made
        _to_job_log(logging.INFO, f"{PROG}: {result.info['engine_note']}")
    write_run_outputs(run_dir, cfg.to_dict(), result, extra=extra, plot=cfg.run.plot)
    summary = _summary_line(cfg, result, run_dir)
    print(summary, flush=True)
    _to_job_log(logging.INFO, summary)
    if result.status == "interrupted":
        hint = (f": continue with run.resume=true storage.url={result.info.get('store')}"
                if cfg.run.checkpoint_every and result.info.get("store") else "")
        _say_and_log(f"{PROG}: interrupted after {result.iterations} iterations; the "
                     f"results so far are in {run_dir}{hint}", logging.WARNING)
        raise SystemExit(EXIT_INTERRUPTED)
    if result.status == "stalled":
        _say_and_log(f"{PROG}: error: the run did not learn: {result.message}", logging.ERROR)
        raise SystemExit(EXIT_FAILED_RUN)
    if result.status in FAILED:
        kept = result.info.get("model_iteration")
        _say_and_log(f"{PROG}: error: the run failed ({result.status}): {result.message}"
                     + (f"; the model kept is that of iteration {kept}" if kept is not None
                        else ""), logging.ERROR)
        raise SystemExit(EXIT_FAILED_RUN)


_hydra_main = hydra.main(version_base=None, config_path=CONFIG_PATH, config_name=CONFIG_NAME)(
    _task
)


# ------------------------------------------------------------------------------------------- main

def _args_parser() -> argparse.ArgumentParser:
    """The command line as ``hydra.main`` reads it, for the pre-flight: the overrides, where
    the configs come from, ``--multirun`` and the flags that run nothing. ``main`` parses with
    ``parse_known_args``: a flag of a newer Hydra that this parser does not know skips the
    pre-flight and is left to ``hydra.main``."""
    ap = argparse.ArgumentParser(prog=PROG, add_help=False)
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--help", "-h", action="store_true")
    ap.add_argument("--hydra-help", action="store_true")
    ap.add_argument("--cfg", "-c", choices=["job", "hydra", "all"])
    ap.add_argument("--resolve", action="store_true")
    ap.add_argument("--package", "-p")
    ap.add_argument("--run", "-r", action="store_true")
    ap.add_argument("--multirun", "-m", action="store_true")
    ap.add_argument("--shell-completion", "-sc", action="store_true")
    ap.add_argument("--config-path", "-cp")
    ap.add_argument("--config-name", "-cn")
    ap.add_argument("--config-dir", "-cd")
    ap.add_argument("--experimental-rerun")
    ap.add_argument("--info", "-i", nargs="?", const="all",
                    choices=["all", "config", "defaults", "defaults-tree", "plugins",
                             "searchpath"])
    return ap



def main(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point (``daskadmm``)."""
    global _STARTED
    _STARTED = time.time()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv == ["--version"]:  # daskadmm's own version, not Hydra's
        from importlib.metadata import version

        print(f"{PROG} {version('daskadmm')}")
        return
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
    args, unknown = _args_parser().parse_known_args(argv)  # usage errors: exit 2
    configs: list[Config] = []
    if not unknown and not any(getattr(args, flag, None) for flag in _NON_RUN_FLAGS):
        try:
            configs = _preflight(args)
            _check_stores(configs)
        except UsageError as exc:
            _fail(str(exc))
    old_argv = sys.argv
    sys.argv = [old_argv[0] if old_argv else PROG, *argv]
    try:
        with _shared_cluster(args, configs):
            _hydra_main()
    finally:
        sys.argv = old_argv
        _PRELOADED.clear()


if __name__ == "__main__":
    main()
