"""The Python API: ``load_data(cfg)`` and ``fit(cfg) -> Result``.

``fit`` builds the network from the data set's shape, initialises the weights from
``run.seed``, and runs the configured algorithm on the configured engine (the serial reference,
or Dask). Nothing here imports Hydra.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from . import heap
from .config import (
    ADMM_ALGORITHMS,
    ALGORITHM_KEYS,
    AlgorithmConfig,
    Config,
    RunConfig,
    validate,
)
from .data import DATA_ARRAYS, Dataset, lazy_arrays, load_dataset
from .engine_options import EngineOptions
from .model import Architecture, init_weights, metrics
from .monitor import Monitor
from .result import Result
from .schedules import PenaltySchedule, ScheduleOptions
from .splitting import Options

__all__ = ["build_architecture", "engine_options", "evaluator", "fit", "load_data",
           "schedule_options", "with_dtype"]


def load_data(cfg: Config) -> Dataset:
    """Load the configured data set (raises :class:`daskadmm.data.DataError` on bad input)."""
    return load_dataset(cfg.data, seed=cfg.run.seed)


def build_architecture(cfg: Config, ds: Dataset) -> Architecture:
    m = cfg.model
    loss = m.loss
    if loss == "auto":
        loss = "cross_entropy" if ds.task == "classification" else "mse"
    return Architecture(kind=m.kind, depth=m.depth, d_in=ds.d_in, width=m.width,
                        d_out=ds.d_out, activation=m.activation, leaky_slope=m.leaky_slope,
                        bias=m.bias, loss=loss)


def schedule_options(a: AlgorithmConfig, run: RunConfig | None = None) -> ScheduleOptions:
    """The penalty schedule's options from the ``algorithm`` section (and ``run.eval_every``,
    where the rises schedule sees the training loss; None: the schema's run section)."""
    run = run or RunConfig()
    return ScheduleOptions(kind=a.schedule, rho=a.rho, beta=a.beta, tau=a.tau, lam=a.lam,
                           nu=a.nu, growth=a.growth, rho_max=a.rho_max, beta_max=a.beta_max,
                           adapt_every=a.adapt_every, adapt_factor=a.adapt_factor,
                           adapt_tol=a.adapt_tol, rise_count=a.rise_count,
                           eval_every=run.eval_every, backtrack_start=a.backtrack_start)


def engine_options(cfg: Config) -> EngineOptions:
    """What the Dask engines read of ``cfg`` (they never see the whole :class:`Config`)."""
    from .storage import determinants

    r = cfg.run
    return EngineOptions(algorithm=cfg.algorithm.name, iterations=r.iterations,
                         window=r.window, checkpoint_every=r.checkpoint_every,
                         resume=r.resume, dtype=r.dtype, cluster=cfg.cluster,
                         storage=cfg.storage, config=cfg.to_dict(),
                         determinants=determinants(cfg.to_dict()))


def metric_name(ds: Dataset) -> str:
    return "accuracy" if ds.task == "classification" else "mse"


def evaluator(arch: Architecture, ds: Dataset) -> Callable[[list[np.ndarray]], dict[str, float]]:
    """Metrics of the true forward pass on the train and test splits."""
    key = metric_name(ds)

    def evaluate(weights: list[np.ndarray]) -> dict[str, float]:
        with np.errstate(all="ignore"):
            tr = metrics(arch, weights, ds.X_train, ds.Y_train, ds.task)
            te = metrics(arch, weights, ds.X_test, ds.Y_test, ds.task)
        return {"train_loss": tr["loss"], "test_loss": te["loss"],
                "train_metric": tr[key], "test_metric": te[key]}

    return evaluate


def with_dtype(ds: Dataset, dtype: np.dtype) -> Dataset:
    """``ds`` with its data arrays in ``dtype`` (the standardisation is computed in float64
    first, so a float32 run sees the float64 run's data rounded once)."""
    import dataclasses

    arrays: dict[str, Any] = {k: getattr(ds, k).astype(dtype) for k in DATA_ARRAYS}
    return dataclasses.replace(ds, **arrays)


def fit(cfg: Config, *, run_dir: Path | None = None,
        callback: Callable[[dict], None] | None = None,
        dataset: Dataset | None = None, client: Any = None) -> Result:
    """Train the configured network; return a :class:`~daskadmm.result.Result`.

    ``run_dir``: where the run keeps its state store and model (None: a scratch directory,
    removed at the end; the result carries the weights). ``callback(record)`` is called with
    every evaluation record. ``dataset`` replaces the configured data set. ``client``: a
    ``distributed.Client`` to run on; with ``cluster.kind=local`` an active client of this
    process (``Client.current()``) is used the same way, instead of starting a cluster. Such a
    client is never closed by the run.
    """
    validate(cfg)
    # numpy and scipy each bundle an OpenBLAS whose idle threads spin; on a small machine two
    # spinning pools slow small factorizations ~100x. One BLAS thread per process unless asked.
    # Sample-sized arrays from the heap instead of fresh page-faulting mappings (see
    # daskadmm.heap); the free memory goes back to the system at the end of the run.
    reuse = cfg.cluster.reuse_memory and heap.reuse_freed_memory()
    try:
        with threadpool_limits(limits=cfg.cluster.blas_threads, user_api="blas"):
            return _fit(cfg, run_dir=run_dir, callback=callback, dataset=dataset,
                        client=client)
    finally:
        if reuse:
            heap.give_back()


def _resolve_chunk_size(cfg: Config, ds: Dataset, client: Any) -> tuple[Config, str | None]:
    """``storage.chunk_size=auto`` made a number: for the Zarr-resident engine, the choice of
    :func:`daskadmm.engines.cluster.chunk_size_for` (said on stderr), or, resuming, the store's
    own chunk size; 0 (one chunk) for every other engine, which keeps no chunked store."""
    size: int = 0
    note = None
    if cfg.cluster.kind != "reference" and cfg.storage.state == "zarr" and \
            cfg.algorithm.name in ADMM_ALGORITHMS:
        if cfg.run.resume:
            from .storage import StateStore

            try:  # an unusable store is refused, with its reason, where the resume opens it
                size = int(StateStore.open(str(cfg.storage.url), mode="check")
                           .attrs.get("chunk_size", 0))
            except Exception:
                size = 0
        else:
            from .config import state_bytes
            from .engines.cluster import chunk_size_for, say

            size, note = chunk_size_for(cfg.cluster, ds.n_train, state_bytes(cfg, ds.n_train),
                                        client)
            say(f"daskadmm: {note}")
    return dataclasses.replace(cfg, storage=dataclasses.replace(cfg.storage,
                                                                chunk_size=size)), note


def _fit(cfg: Config, *, run_dir: Path | None, callback: Callable[[dict], None] | None,
         dataset: Dataset | None, client: Any) -> Result:
    ds = dataset if dataset is not None else load_data(cfg)
    data_note = None
    if lazy_arrays(ds) and not (cfg.cluster.kind != "reference" and cfg.storage.state == "zarr"
                                and cfg.algorithm.name in ADMM_ALGORITHMS):
        # out-of-core input (Dask arrays) goes straight into the Zarr store; the other engines
        # hold the data in memory
        from .lazy import materialise

        if client is None:
            from .engines.cluster import current_client

            client = current_client() if cfg.cluster.kind in ("local", "address") else None
        ds = materialise(ds, client)
        data_note = ("the Dask input was read into memory: only the Zarr-resident state on "
                     "Dask keeps it out of core")
    if cfg.run.dtype != "float64":
        ds = with_dtype(ds, np.dtype(cfg.run.dtype))
    engine_note = None
    asked = cfg  # the configuration as given (what the stored model records)
    if cfg.cluster.kind == "local" and not lazy_arrays(ds):  # (no engine import otherwise)
        from .config import state_bytes
        from .engines.cluster import in_process_reason, say

        engine_note = in_process_reason(engine_options(cfg), state_bytes(cfg, ds.n_train),
                                        client)
        if engine_note:
            say(f"daskadmm: {engine_note}")
            cfg = dataclasses.replace(
                cfg, cluster=dataclasses.replace(cfg.cluster, kind="threads"),
                storage=dataclasses.replace(cfg.storage, state="memory"))
    chunk_note = None
    if cfg.storage.chunk_size == "auto":
        cfg, chunk_note = _resolve_chunk_size(cfg, ds, client)
    elif not isinstance(cfg.storage.chunk_size, int):  # a NumPy integer (a search grid's)
        cfg = dataclasses.replace(cfg, storage=dataclasses.replace(
            cfg.storage, chunk_size=int(cfg.storage.chunk_size)))
    from .config import check_resources

    check_resources(cfg, ds.n_train, ds.n_test, ds.d_in, ds.d_out,
                    default_store="memory://" if run_dir is None else Path(run_dir) / "state.zarr")
    name = cfg.algorithm.name
    model_url = None
    if run_dir is not None:
        # an earlier run's outputs there are refused now, not replaced as this run writes
        # its own (the CLI has said so already, naming hydra.run.dir)
        from .outputs import outputs_in_the_way
        from .storage import StoreError

        found = outputs_in_the_way(Path(run_dir), resume=cfg.run.resume, url=cfg.storage.url,
                                   overwrite=cfg.storage.overwrite)
        if found:
            raise StoreError(f"run directory {run_dir} already holds a run's outputs "
                             f"({', '.join(found)}): give another run directory, or replace "
                             "them with storage.overwrite=true (nothing was changed)")
    if run_dir is not None and not (cfg.cluster.kind != "reference" and
                                    cfg.storage.state == "zarr" and name in ADMM_ALGORITHMS):
        # the state stays in memory; the final model goes into run_dir/model.zarr: a store
        # there to replace (storage.overwrite) is checked now, not after the run
        from .storage import StateStore

        model_url = str(Path(run_dir) / "model.zarr")
        StateStore.check_new(model_url, overwrite=cfg.storage.overwrite)
    arch = build_architecture(cfg, ds)
    rng = np.random.default_rng(cfg.run.seed)
    m = cfg.model
    weights0 = init_weights(arch, rng, m.residual_scale, m.depth_scaling,
                            normal_std=m.init_std if m.init == "normal" else None)
    if cfg.run.dtype != "float64":  # drawn in float64, so both types start from the same draw
        weights0 = [W.astype(cfg.run.dtype) for W in weights0]
    monitor = Monitor(
        iterations=cfg.run.iterations,
        eval_every=cfg.run.eval_every,
        evaluate=evaluator(arch, ds),
        tol_primal=cfg.run.tol_primal,
        tol_dual=cfg.run.tol_dual,
        diverge_factor=cfg.run.diverge_factor,
        callback=callback,
        stall_iterations=cfg.run.stall_iterations,
        chance=(float(ds.Y_train.mean(axis=1).max()) if ds.task == "classification" and
                ds.n_train else None),
    )
    if name not in ADMM_ALGORITHMS:
        from . import baseline  # optional extra (PyTorch)

        result = baseline.fit(cfg.algorithm, arch, ds, weights0, monitor, seed=cfg.run.seed,
                              dtype=cfg.run.dtype, threads=cfg.cluster.blas_threads)
    else:
        from .algorithms import get_algorithm

        algorithm = get_algorithm(name)
        a = cfg.algorithm
        # (a key the algorithm does not read keeps the value that changes nothing: the
        # per-block decay is RADMM-3/3L/3A's only, the restarts RADMM-3A's)
        reads = ALGORITHM_KEYS[name]
        options = Options(step=a.step, backtrack_max=a.backtrack_max,
                          newton_max_iter=a.newton_max_iter, output_init=a.output_init,
                          relax=a.relax,
                          input_lam_scale=a.input_lam_scale if "input_lam_scale" in reads else 1.0,
                          hidden_lam_scale=(a.hidden_lam_scale if "hidden_lam_scale" in reads
                                            else 1.0),
                          restart_every=a.restart_every if "restart_every" in reads else 0,
                          restart_guard=(bool(a.restart_guard) and "restart_guard" in reads
                                         and a.restart_every > 0))
        schedule = PenaltySchedule(schedule_options(a, cfg.run))
        if cfg.cluster.kind == "reference":
            from .engines.reference import solve

            result = solve(algorithm.splitting, arch, ds.X_train, ds.Y_train, weights0, schedule,
                           monitor, options)
        elif cfg.storage.state == "zarr":
            from .engines.driver import run_zarr

            result = run_zarr(engine_options(cfg), algorithm, arch, ds, weights0, schedule,
                              monitor, options, run_dir=run_dir, client=client)
        else:
            from .engines.driver import run_dask

            result = run_dask(engine_options(cfg), algorithm, arch, ds, weights0, schedule,
                              monitor, options, run_dir=run_dir, client=client)
    if data_note:
        result.info["data_note"] = data_note
    if engine_note:
        result.info["engine_note"] = engine_note
    if chunk_note:
        result.info["chunking"] = chunk_note
    result.metric = metric_name(ds)
    monitor.keep_good(result)
    if model_url is not None and "store" not in result.info:
        from .storage import save_model_store

        meta: dict[str, Any] = {"config": asked.to_dict(), "algorithm": name}
        if engine_note:
            meta["engine_note"] = engine_note
        save_model_store(model_url, arch, result.weights, ds, result.metric, meta,
                         overwrite=cfg.storage.overwrite)
        result.info["store"] = model_url
    result.info.setdefault("data", {"name": ds.name, "source": ds.source,
                                    "n_train": ds.n_train, "n_test": ds.n_test,
                                    "d_in": ds.d_in, "d_out": ds.d_out, "task": ds.task})
    return result
