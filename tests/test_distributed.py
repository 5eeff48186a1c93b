"""The Dask executor on a real 2-process LocalCluster: same results as local, models loaded once
per worker, chunks of a killed worker re-run elsewhere, and a chunk that kills every worker
named in a clear error."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import sys
import time
import uuid
from pathlib import Path
from typing import ClassVar

import attrs
import numpy as np
import pytest
import torch
import xarray as xr

from patchspec import Sweep, catalog
from patchspec.errors import ExecutorError, OptionError
from patchspec.execute.batched import BatchedEstimator
from patchspec.execute.protocols import Chunk, Task
from tests.conftest import logit_diff_metric, per_example_metric
from tests.models import build

distributed = pytest.importorskip("distributed")

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def client():
    """A 2-worker, 1-thread-each LocalCluster on 127.0.0.1 (random ports), for this module.

    A chunk is given up on after it killed 2 workers (``allowed-failures`` 1), so the test of a
    chunk that kills every worker stays short.
    """
    import dask

    settings = {
        "distributed.scheduler.allowed-failures": 1,
        # Workers fork from this process, which has imported torch, transformer_lens and
        # patchspec already (with 1 torch thread and no CUDA context, so forking is safe):
        # starting or restarting one takes a fraction of a second instead of a fresh import of
        # each (10-30 s on a shared 2-core machine). "forkserver" is the safe fallback.
        "distributed.worker.multiprocessing-method": "fork",
    }
    with dask.config.set(settings):
        cluster = distributed.LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            scheduler_port=0,
            dashboard_address=None,
            worker_dashboard_address=None,
        )
        client = distributed.Client(cluster)
        try:
            client.wait_for_workers(2, timeout=120)
            yield client
        finally:
            client.close()
            cluster.close(timeout=30)


def _same(distributed_result: xr.DataArray | xr.Dataset, local: xr.DataArray | xr.Dataset) -> None:
    xr.testing.assert_allclose(distributed_result, local, rtol=1e-6, atol=1e-6)
    got, want = dict(distributed_result.attrs), dict(local.attrs)
    if isinstance(local, xr.Dataset):  # the executor is in each variable's attrs
        for name in local.data_vars:
            assert distributed_result[name].attrs.pop("executor") == "dask"
            assert local[name].attrs.pop("executor") == "local"
            assert distributed_result[name].attrs == local[name].attrs
    else:
        assert got.pop("executor") == "dask" and want.pop("executor") == "local"
    assert got == want
    for name, coord in local.coords.items():  # same labels, not only the same values
        assert distributed_result.coords[name].values.tolist() == coord.values.tolist()


@pytest.mark.parametrize("kind", ["gpt2", "qwen2"])
def test_catalogue_sweep_equals_local(kind, request, tokens, client, capsys) -> None:
    """A Sweep of catalogue specs on a cluster equals the local run: values, labels, attrs."""
    model = request.getfixturevalue(kind)
    clean, corrupted = tokens
    sweep = Sweep(catalog.RESID_PRE, catalog.HEAD_OUT_BY_POS, catalog.HEAD_V)
    local = sweep.run(model, clean, corrupted, logit_diff_metric, cells_per_batch=8)
    remote = sweep.run(
        model, clean, corrupted, logit_diff_metric, cells_per_batch=8, executor=client, progress=True
    )
    _same(remote, local)
    bar = capsys.readouterr().err
    assert "patching 3 specs (batched)" in bar and "head_v: 2/2 chunks" in bar


@pytest.mark.parametrize("kind", ["gpt2", "qwen2"])
def test_attribution_estimates_equal_local(kind, request, tokens, client) -> None:
    """Attribution patching runs on the cluster too (the gradients made once per worker) and
    equals the local estimate, exact=False and estimator in attrs as locally."""
    model = request.getfixturevalue(kind)
    clean, corrupted = tokens
    sweep = Sweep(catalog.HEAD_OUT_BY_POS, catalog.HEAD_K)
    local = sweep.run(model, clean, corrupted, per_example_metric, estimator="atp", max_memory=4096)
    remote = sweep.run(
        model, clean, corrupted, per_example_metric, estimator="atp", max_memory=4096, executor=client
    )
    _same(remote, local)
    assert remote["head_k"].attrs["estimator"] == "atp" and remote["head_k"].attrs["exact"] is False


def test_model_loaded_once_per_worker_and_run_built_once(gpt2, tokens, client) -> None:
    """Each worker loads a model once for every run on it, and builds each run's session once
    for all of its chunks; a per-example metric and the reference estimator match too."""
    clean, corrupted = tokens
    spec = catalog.HEAD_OUT_BY_POS
    local = spec.run(gpt2, clean, corrupted, per_example_metric, engine="reference")
    remote = spec.run(gpt2, clean, corrupted, per_example_metric, engine="reference", executor=client)
    _same(remote, local)
    again = spec.run(gpt2, clean, corrupted, per_example_metric, cells_per_batch=4, executor=client)
    xr.testing.assert_allclose(again, local, rtol=1e-6, atol=1e-6)

    def counts(dask_worker) -> dict[str, tuple[int, int]]:
        return {
            name: (plugin.loads, plugin.builds)
            for name, plugin in dask_worker.plugins.items()
            if name.startswith("patchspec-model-")
        }

    seen = client.run(counts)
    fingerprint_plugins = {name for per in seen.values() for name in per}
    assert fingerprint_plugins  # the model went through a plugin
    for per in seen.values():
        for loads, builds in per.values():
            assert loads <= 1 and builds <= 4  # at most one session per run, never per chunk


def test_workers_refuse_another_model(gpt2, tokens, client, tmp_path) -> None:
    """A model source that loads other weights is refused on the worker, before any chunk runs,
    naming the fingerprints."""
    from patchspec.execute.distributed import DaskExecutor, ModelSource

    clean, corrupted = tokens
    other = DaskExecutor(client, model=ModelSource(build, ("gpt2", tmp_path / "seed1"), {"seed": 1}))
    with pytest.raises(ExecutorError, match=r"other model weights than the caller"):
        catalog.RESID_PRE.run(gpt2, clean, corrupted, logit_diff_metric, executor=other)


def test_cluster_sweep_writes_a_store_a_local_rerun_reads(gpt2, tokens, client, tmp_path) -> None:
    """A cluster run with store= writes every chunk as it arrives; a local rerun of the same
    sweep reads them all back (no patched pass) and gives the same values."""
    from tests.test_store import Counting

    clean, corrupted = tokens
    spec = catalog.ATTN_OUT
    store = tmp_path / "s.zarr"
    remote = spec.run(gpt2, clean, corrupted, logit_diff_metric, executor=client, store=store, engine=Counting())
    rerun = Counting()
    local = spec.run(gpt2, clean, corrupted, logit_diff_metric, engine=rerun, store=store)
    assert rerun.calls == 0
    _same(remote, local)


@attrs.define
class Slow:
    """The batched estimator, leaving a file per chunk run (with the worker's pid) in
    ``folder`` and sleeping first, so a test can kill a worker mid-chunk; ``poison`` kills the
    worker process running a chunk instead."""

    name: ClassVar[str] = "batched"
    exact: ClassVar[bool] = True
    folder: str
    inner: BatchedEstimator = attrs.field(factory=lambda: BatchedEstimator(cells_per_batch=2, lean=False))
    sleep: float = 0.4
    poison: bool = False

    def chunks(self, task: Task) -> list[Chunk]:
        return self.inner.chunks(task)

    def estimate(self, task: Task, chunk: Chunk) -> torch.Tensor:
        first = int(chunk.cells[0])
        mark = Path(self.folder) / f"chunk{first}-pid{os.getpid()}-{uuid.uuid4().hex[:6]}"
        mark.write_text("start")
        if self.poison:
            os._exit(3)
        time.sleep(self.sleep)
        values = self.inner.estimate(task, chunk)
        mark.write_text("done")
        return values


def test_killed_worker_chunks_rerun_elsewhere(gpt2, tokens, client, tmp_path) -> None:
    """Killing a worker mid-chunk: its chunk runs again on the other worker, and the result is
    the local one."""
    clean, corrupted = tokens
    spec = catalog.RESID_PRE  # 12 cells: 6 chunks of 2
    local = spec.run(gpt2, clean, corrupted, logit_diff_metric)
    client.wait_for_workers(2, timeout=120)
    slow = Slow(str(tmp_path))
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        running = pool.submit(
            spec.run, gpt2, clean, corrupted, logit_diff_metric, engine=slow, executor=client
        )
        victim = None
        deadline = time.monotonic() + 60
        while victim is None and time.monotonic() < deadline:
            started = [p for p in tmp_path.iterdir() if p.read_text() == "start"]
            if started:
                victim = started[0]
            else:
                time.sleep(0.02)
        assert victim is not None, "no chunk started"
        pid = int(victim.name.split("-pid")[1].split("-")[0])
        os.kill(pid, signal.SIGKILL)
        remote = running.result(timeout=120)
    _same(remote, local)
    runs: dict[str, int] = {}
    for mark in tmp_path.iterdir():
        chunk = mark.name.split("-")[0]
        runs[chunk] = runs.get(chunk, 0) + 1
    killed = victim.name.split("-")[0]
    assert runs[killed] >= 2, runs  # the chunk that was running on the dead worker ran again
    assert len(runs) == 6


def test_missing_extra_names_the_install(monkeypatch) -> None:
    """Without distributed installed, the executor says what to install."""
    from patchspec.execute.distributed import DaskExecutor

    monkeypatch.setitem(sys.modules, "distributed", None)  # import distributed -> ImportError
    with pytest.raises(OptionError, match=r"pip install 'patchspec\[distributed\]'"):
        DaskExecutor(object())


def test_executor_checks_its_arguments(client) -> None:
    """A non-Client, bad retries or a bad model source are refused when the executor is made."""
    from patchspec.execute.distributed import DaskExecutor

    with pytest.raises(OptionError, match=r"needs a dask.distributed.Client, got int"):
        DaskExecutor(3)
    with pytest.raises(OptionError, match=r"retries must be an int >= 0, got -1"):
        DaskExecutor(client, retries=-1)
    with pytest.raises(OptionError, match=r"model must be a folder path, a loader callable"):
        DaskExecutor(client, model=3)


def test_chunk_that_kills_every_worker_names_its_cells(gpt2, tokens, client, tmp_path) -> None:
    """A chunk that kills each worker it is sent to fails the sweep with an ExecutorError
    naming its cells (runs last: it leaves the cluster restarting its workers)."""
    clean, corrupted = tokens
    spec = catalog.RESID_PRE.sel(layer=0, pos=[0, 1])  # one chunk of 2 cells
    client.wait_for_workers(2, timeout=120)
    poison = Slow(str(tmp_path), poison=True)
    cells = r"a chunk of 2 cells of 'resid_pre': layer=0, pos=0; layer=0, pos=1 killed every worker"
    with pytest.raises(ExecutorError, match=cells):
        spec.run(gpt2, clean, corrupted, logit_diff_metric, engine=poison, executor=client)
    assert len(list(tmp_path.iterdir())) == 2  # it ran, and killed, twice
    assert np.all([p.read_text() == "start" for p in tmp_path.iterdir()])
