"""Bad input that used to give a traceback or hang is a one-line ConfigError / DataError: seeds out
of numpy's range, malformed cluster settings, networks too large for the machine, data paths that
are not regular files (devices, FIFOs, directories); and the storage keys overwrite / break_lock."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import stat
import tracemalloc
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml
from support import assert_usage_error, run_cli

from daskadmm import config as config_mod
from daskadmm import data as data_mod
from daskadmm.config import (
    Config,
    ConfigError,
    DataConfig,
    StorageConfig,
    check_resources,
    from_mapping,
    validate,
)
from daskadmm.data import DataError, Dataset, load_dataset, read_csv

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
GIB = 2**30
DIGITS = dict(n_train=1437, n_test=360, d_in=64, d_out=10)  # the default run's data set


@contextlib.contextmanager
def deadline(seconds: float):
    """Fail (instead of hanging) if the block takes longer than ``seconds``."""

    def expired(signum, frame):
        raise TimeoutError(f"blocked for more than {seconds} s")

    old = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text
    return text


# ------------------------------------------------------------------------------------------
# seeds


@pytest.mark.parametrize(("section", "value"), [
    ("run", -1), ("run", 2**32), ("run", 10**30), ("data", -1), ("data", 2**32),
])
def test_seed_out_of_range(section, value):
    with pytest.raises(ConfigError, match=rf"{section}\.seed must be in \[0, 4294967295\]") as e:
        from_mapping({section: {"seed": value}})
    assert str(value) in one_line(e)


def test_seed_bounds_accepted():
    cfg = from_mapping({"run": {"seed": 2**32 - 1}, "data": {"seed": 0}})
    assert cfg.run.seed == 2**32 - 1
    assert from_mapping({"data": {"seed": None}}).data.seed is None
    cfg = Config()
    cfg.run.seed = -5  # validate() checks objects built in Python, too
    with pytest.raises(ConfigError, match="run.seed"):
        validate(cfg)


# ------------------------------------------------------------------------------------------
# cluster


def address(value):
    return {"cluster": {"kind": "address", "address": value}}


@pytest.mark.parametrize(("value", "why"), [
    ("notaurl", "no port"),
    ("http://host:8786", "unknown scheme 'http'"),
    ("tcp://host", "no port"),
    ("tcp://host:0", "port '0'"),
    ("tcp://host:65536", "port '65536'"),
    ("tcp://host:port", "port 'port'"),
    ("tcp://:8786", "no host"),
    ("tcp://::1:8786", "IPv6 host in brackets"),
    ("host name:8786", "bad host"),
    ("tcp://host:8786/path", "port '8786/path'"),
])
def test_bad_cluster_address(value, why):
    with pytest.raises(ConfigError) as e:
        from_mapping(address(value))
    msg = one_line(e)
    assert msg.startswith("cluster.address must be [scheme://]host:port")
    assert "tcp://host:8786" in msg and repr(value) in msg and why in msg


@pytest.mark.parametrize("value", [
    "tcp://127.0.0.1:8786", "scheduler:8786", "tls://dask.example.org:8786", "ucx://10.0.0.1:1",
    "ws://host:65535", "wss://host:443", "tcp://[::1]:8786", "inproc://10.0.0.1/1234/1",
])
def test_good_cluster_address(value):
    assert from_mapping(address(value)).cluster.address == value


def test_address_ignored_for_other_kinds():
    cfg = from_mapping({"cluster": {"kind": "local", "address": "notaurl"}})
    assert cfg.cluster.kind == "local"


@pytest.mark.parametrize("value", ["abc", "", " ", "-4GB", "0", "0GB", -1, "inf", "nan", "AUTO",
                                   "4 parsecs", True])
def test_bad_memory_limit(value):
    with pytest.raises(ConfigError, match=r"cluster\.memory_limit must be auto, a number of "
                                          r"bytes, a fraction in \(0, 1\]") as e:
        from_mapping({"cluster": {"memory_limit": value}})
    one_line(e)


@pytest.mark.parametrize("value", ["auto", "4GB", "512 MiB", "2.5 GiB", 0.5, 1, 4e9, "1e9",
                                   4_000_000_000])
def test_good_memory_limit(value):
    from_mapping({"cluster": {"memory_limit": value}})


@pytest.mark.parametrize("value", [0, -1, "inf", "nan"])
def test_bad_connect_timeout(value):
    with pytest.raises(ConfigError, match=r"cluster\.connect_timeout must be > 0 and finite"):
        from_mapping({"cluster": {"connect_timeout": value}})


# ------------------------------------------------------------------------------------------
# model size: hard bounds and the resource estimate


@pytest.mark.parametrize(("key", "value", "bound"), [
    ("width", 1_000_000, 65536), ("width", 65537, 65536), ("depth", 1_000_000, 10000),
    ("depth", 10001, 10000),
])
def test_model_hard_bounds(key, value, bound):
    with pytest.raises(ConfigError, match=rf"model\.{key} must be <= {bound}, got {value}"):
        from_mapping({"model": {key: value}})
    from_mapping({"model": {key: bound, "depth" if key == "width" else "width": 2}})


def fake_memory(monkeypatch, available: int) -> None:
    import psutil

    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(available=available))


def fake_disk(monkeypatch, free: int) -> list[Path]:
    probed: list[Path] = []

    def usage(path):
        probed.append(Path(path))
        return SimpleNamespace(total=10 * free, used=9 * free, free=free)

    monkeypatch.setattr(shutil, "disk_usage", usage)
    return probed


def test_default_run_fits():
    check_resources(Config(), **DIGITS)
    check_resources(from_mapping({"cluster": {"kind": "reference"}}), **DIGITS)
    check_resources(from_mapping({"algorithm": {"name": "adam"}}), **DIGITS)


def test_weights_too_large_real_machine():
    cfg = from_mapping({"model": {"width": 65536, "depth": 10000}})
    tracemalloc.start()
    try:
        with pytest.raises(ConfigError) as e:
            check_resources(cfg, **DIGITS)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2**20  # an estimate, nothing allocated
    msg = one_line(e)
    assert msg.startswith("model.width=65536, model.depth=10000: the weights alone need ")
    assert "e6 GiB, this machine has " in msg and msg.endswith(" GiB available")


def test_weights_message_numbers(monkeypatch):
    fake_memory(monkeypatch, int(18.2 * GIB))
    cfg = from_mapping({"model": {"width": 20000, "depth": 1000}, "algorithm": {"name": "sgd"}})
    with pytest.raises(ConfigError) as e:
        check_resources(cfg, **DIGITS)
    # 4 copies x 8 bytes x (998 x 20000 x 20001 + small layers) = 1.19e4 GiB
    assert one_line(e) == ("model.width=20000, model.depth=1000: the weights alone need 1.2e4 GiB, "
                           "this machine has 18.2 GiB available")


def state_gib(depth: int, width: int, n: int) -> float:
    return 3 * depth * width * n * 8 / GIB


@pytest.mark.parametrize("overrides", [
    {"cluster": {"kind": "reference"}},
    {"storage": {"state": "memory"}},
    {"cluster": {"kind": "threads"}, "storage": {"url": "memory://x"}},  # two slots in memory
], ids=["reference", "state-memory", "memory-store"])
def test_state_in_memory_too_large(monkeypatch, overrides):
    fake_memory(monkeypatch, 4 * GIB)
    n = 200_000  # 3 x 4 x 256 x 200000 x 8 bytes = 4.6 GiB
    cfg = from_mapping({"model": {"width": 256, "depth": 4}, **overrides})
    assert state_gib(4, 256, n) > 4
    with pytest.raises(ConfigError) as e:
        check_resources(cfg, n, 1000, 64, 10)
    msg = one_line(e)
    assert msg.startswith("model.width=256, model.depth=4, 200000 training samples: the run needs ")
    assert "GiB of memory (weights " in msg and "this machine has 4.0 GiB available" in msg
    assert "ADMM state 4.6," in msg or "ADMM state 9.2," in msg
    # the baselines hold no ADMM state
    check_resources(from_mapping({"model": {"width": 256, "depth": 4},
                                  "algorithm": {"name": "adam"}}), n, 1000, 64, 10)
    # the workers of cluster=address hold it on their own machines
    remote = from_mapping({"model": {"width": 256, "depth": 4}, "storage": {"state": "memory"},
                           **address("tcp://host:8786")})
    check_resources(remote, n, 1000, 64, 10)


def test_zarr_store_on_disk(monkeypatch, tmp_path):
    fake_memory(monkeypatch, 4 * GIB)
    probed = fake_disk(monkeypatch, 5 * GIB)
    url = tmp_path / "not" / "yet" / "state.zarr"
    cfg = from_mapping({"model": {"width": 256, "depth": 4}, "storage": {"url": str(url)}})
    n = 200_000  # the store: 2 slots x 4.6 GiB on disk, nothing of it in memory
    with pytest.raises(ConfigError) as e:
        check_resources(cfg, n, 1000, 64, 10)
    assert one_line(e) == (
        f"storage.url={url}: the ADMM state store for model.width=256, model.depth=4, 200000 "
        f"training samples needs 9.2 GiB on disk, {tmp_path} has 5.0 GiB free; choose another "
        "storage.url or lower model.width, model.depth or data.n_train")
    assert probed == [tmp_path]  # the nearest existing parent
    check_resources(cfg, n // 2, 1000, 64, 10)  # 4.6 GiB fits

    # null storage.url: the store goes under the current directory (or default_store)
    monkeypatch.chdir(tmp_path)
    default = from_mapping({"model": {"width": 256, "depth": 4}})
    with pytest.raises(ConfigError, match=r"^storage\.url=null: .* needs 9\.2 GiB on disk"):
        check_resources(default, n, 1000, 64, 10)
    with pytest.raises(ConfigError, match="storage.url=null"):
        check_resources(default, n, 1000, 64, 10, default_store=tmp_path / "run" / "state.zarr")
    with pytest.raises(ConfigError, match=r"needs 9\.\d GiB of memory .*ADMM state 9\.2,"):
        check_resources(default, n, 1000, 64, 10, default_store="memory://")


def test_zarr_store_not_measured(monkeypatch, tmp_path):
    fake_memory(monkeypatch, 4 * GIB)
    probed = fake_disk(monkeypatch, 1)
    n = 200_000
    existing = tmp_path / "state.zarr"  # resumed or replaced: its space is already taken
    existing.mkdir()
    for url in (str(existing), "s3://bucket/state.zarr"):  # a remote store cannot be measured
        check_resources(from_mapping({"model": {"width": 256, "depth": 4},
                                      "storage": {"url": url}}), n, 1000, 64, 10)
    assert probed == []


def test_fit_checks_resources(monkeypatch):
    from daskadmm import api

    def no_init(*args, **kwargs):
        raise AssertionError("the weights must not be allocated")

    monkeypatch.setattr(api, "init_weights", no_init)
    cfg = from_mapping({"model": {"width": 65536, "depth": 10000}, "cluster": {"kind": "reference"},
                        "run": {"progress": False}})
    onehot = np.eye(2)[:, [0, 1] * 5]
    ds = Dataset(name="tiny", task="classification", X_train=np.zeros((3, 10)),
                 Y_train=onehot, X_test=np.zeros((3, 10)), Y_test=onehot)
    with pytest.raises(ConfigError, match="model.width=65536, model.depth=10000: the weights"):
        api.fit(cfg, dataset=ds)


def test_gib_format():
    assert config_mod._gib(7.3e3 * GIB) == "7.3e3"
    assert config_mod._gib(1.25e6 * GIB) == "1.2e6"
    assert config_mod._gib(18.24 * GIB) == "18.2"
    assert config_mod._gib(512 * GIB) == "512"
    assert config_mod._gib(0.031 * GIB) == "0.031"


# ------------------------------------------------------------------------------------------
# data.path: regular files only


def csv_cfg(path) -> DataConfig:
    return DataConfig(name="csv", path=str(path), target="y", task="regression")


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="no /dev/zero")
@pytest.mark.parametrize("name", ["csv", "wine_red"])
def test_dev_zero(name):
    cfg = csv_cfg("/dev/zero") if name == "csv" else DataConfig(name=name, path="/dev/zero")
    with deadline(5), pytest.raises(DataError) as e:
        load_dataset(cfg)
    assert one_line(e) == ("/dev/zero: not a regular file (it is a character device; data.path "
                           "must name a CSV file)")
    with deadline(5), pytest.raises(DataError, match="not a regular file .*a CSV file is needed"):
        read_csv("/dev/zero")


@pytest.mark.parametrize("name", ["csv", "wine_red"])
def test_fifo_does_not_block(tmp_path, name):
    fifo = tmp_path / "pipe.csv"
    os.mkfifo(fifo)
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    cfg = csv_cfg(fifo) if name == "csv" else DataConfig(name=name, path=str(fifo))
    with deadline(5), pytest.raises(DataError) as e:
        load_dataset(cfg)
    assert one_line(e) == (f"{fifo}: not a regular file (it is a FIFO (named pipe); data.path "
                           "must name a CSV file)")


def test_fifo_in_wine_cache_does_not_block(tmp_path):
    os.mkfifo(tmp_path / "winequality-red.csv")
    with deadline(5), pytest.raises(DataError, match="not a regular file .*FIFO"):
        load_dataset(DataConfig(name="wine_red", cache_dir=str(tmp_path), download=False))


@pytest.mark.parametrize("name", ["csv", "wine_red"])
def test_directory(tmp_path, name):
    cfg = csv_cfg(tmp_path) if name == "csv" else DataConfig(name=name, path=str(tmp_path))
    with pytest.raises(DataError) as e:
        load_dataset(cfg)
    assert one_line(e) == (f"{tmp_path}: not a regular file (it is a directory; data.path must "
                           "name a CSV file)")


def test_symlink_to_regular_file(tmp_path):
    target = tmp_path / "real.csv"
    target.write_text("a,y\n" + "".join(f"{i},{2 * i}\n" for i in range(10)))
    link = tmp_path / "link.csv"
    link.symlink_to(target)
    assert read_csv(link).n_rows == 10
    data_mod._check_regular_file(link, "data.path")  # what load_dataset checks first


# ------------------------------------------------------------------------------------------
# storage.overwrite, storage.break_lock


def test_storage_keys():
    s = StorageConfig()
    assert s.overwrite is False and s.break_lock is False
    cfg = from_mapping({"storage": {"overwrite": "true", "break_lock": True}})
    assert cfg.storage.overwrite is True and cfg.storage.break_lock is True
    for name in ("default", "memory"):
        # the options keep the schema's defaults (false) for both
        group = yaml.safe_load((CONF_DIR / "storage" / f"{name}.yaml").read_text()) or {}
        assert "overwrite" not in group and "break_lock" not in group
        cfg = from_mapping({"storage": group})
        assert cfg.storage.overwrite is False and cfg.storage.break_lock is False


def test_overwrite_with_resume():
    with pytest.raises(ConfigError) as e:
        from_mapping({"run": {"resume": True}, "cluster": {"kind": "threads"},
                      "storage": {"url": "/some/state.zarr", "overwrite": True}})
    assert one_line(e).startswith("storage.overwrite=true contradicts run.resume=true")
    from_mapping({"run": {"resume": True}, "cluster": {"kind": "threads"},
                  "storage": {"url": "/some/state.zarr"}})


# ------------------------------------------------------------------------------------------
# the command line: one line on stderr, exit 2, nothing written


@pytest.mark.parametrize(("args", "needle"), [
    (["run.seed=-1"], "run.seed must be in [0, 4294967295]"),
    (["data=csv", "data.path=/dev/zero", "data.target=y", "data.task=regression"],
     "/dev/zero: not a regular file"),
    (["model.width=1000000"], "model.width must be <= 65536, got 1000000"),
    (["cluster=address", "cluster.address=notaurl"], "cluster.address=tcp://host:8786"),
    (["model.width=65536", "model.depth=10000"],
     "model.width=65536, model.depth=10000: the weights alone need"),
], ids=["seed", "dev-zero", "width-bound", "address", "weights"])
def test_cli_one_line(tmp_path, args, needle):
    if "data.path=/dev/zero" in args and not os.path.exists("/dev/zero"):
        pytest.skip("no /dev/zero")
    proc, work = run_cli(tmp_path, *args, timeout=60)
    assert_usage_error(proc, work, needle)
