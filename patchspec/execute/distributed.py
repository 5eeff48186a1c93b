"""The Dask executor: a sweep's chunks run on the workers of a ``dask.distributed`` cluster.

The cells of a sweep are independent, so a cluster of workers (processes, GPUs, machines)
computes them in parallel with Dask's scheduler, which also re-runs the tasks of a worker that
dies. ``spec.run(..., executor=client)`` (a ``dask.distributed.Client``) or
``executor=DaskExecutor(client, model=...)``:

* the **model** is loaded once per worker, by a worker plugin, from a description that travels
  (:class:`ModelSource`: a folder booted with ``TransformerBridge.boot_transformers``, or a
  loader callable and its arguments; by default the caller's model's folder, else the model
  itself, sent once per worker), never with a task;
* the **sweep** (specs, inputs, metric, options) is sent to the cluster once per run; each worker
  builds the run again (:func:`patchspec.runner.prepare`, :func:`~patchspec.plan.grid.compile`),
  checks it got the same grids, weights fingerprint and tokens as the caller, and computes the
  unpatched runs once for every chunk it is given;
* the **chunks** are the estimator's own (grouped by start layer, sized by the memory budget),
  submitted with ``retries=``; on the worker each runs through the local executor, so a chunk
  that runs out of memory there is split. A chunk that kills every worker it is sent to (more
  than ``distributed.scheduler.allowed-failures`` times) fails the sweep with an
  :class:`~patchspec.errors.ExecutorError` naming its cells;
* values come back to the caller, which reports them to the run's progress bar (cells and
  chunks done, cells per second), writes them to a resumable ``store=`` as they arrive, and
  labels the result exactly as a local run does (``attrs["executor"] == "dask"``).

Needs the ``distributed`` extra: ``pip install 'patchspec[distributed]'``.

Example:
    >>> from dask.distributed import Client, LocalCluster  # doctest: +SKIP
    >>> client = Client(LocalCluster(n_workers=2, threads_per_worker=1))  # doctest: +SKIP
    >>> catalog.HEAD_OUT_BY_POS.run(model, clean, corrupted, metric, executor=client)  # doctest: +SKIP
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import CancelledError
from pathlib import Path
from typing import Any, ClassVar

import attrs
import numpy as np
import torch

from patchspec.errors import ExecutorError, OptionError, PatchSpecError
from patchspec.execute.local import LocalExecutor, assemble
from patchspec.execute.protocols import Chunk, Estimator, Origin, Progress, Task
from patchspec.execute.registry import is_client

try:
    from distributed import WorkerPlugin as _WorkerPlugin
except ImportError:  # the extra is missing: DaskExecutor says what to install
    _WorkerPlugin = object  # type: ignore[assignment,misc]

log = logging.getLogger(__name__)

#: What to install when ``distributed`` is missing.
INSTALL = "pip install 'patchspec[distributed]'"
#: Worker-side sweeps each plugin keeps (the most recent runs).
KEEP_SWEEPS = 2


def require_distributed() -> Any:
    """The ``distributed`` module.

    Raises:
        OptionError: it is not installed (names the extra to install).
    """
    try:
        import distributed
    except ImportError:
        raise OptionError(
            "the dask executor needs dask and distributed, which are not installed: "
            f"{INSTALL} (or pip install dask distributed)"
        ) from None
    return distributed


def worker_device() -> torch.device:
    """The device a worker loads its model on: its (first visible) GPU, else the CPU.

    Give each worker one GPU with ``CUDA_VISIBLE_DEVICES`` (see docs/distributed.md).
    """
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _shipped(model: Any) -> Any:
    """A model sent with the worker plugin, moved to the worker's device."""
    device = worker_device()
    current = getattr(getattr(model, "cfg", None), "device", None)
    if current is not None and torch.device(current) != device and hasattr(model, "to"):
        model = model.to(device)
    return model


@attrs.frozen
class ModelSource:
    """How a worker loads the model: a folder (``TransformerBridge.boot_transformers(folder,
    device=<the worker's device>, **kwargs)``) or ``loader(*args, **kwargs)``.

    Attributes:
        loader: A folder path, or a callable returning a model in eval mode.
        args: Positional arguments of ``loader``.
        kwargs: Keyword arguments of ``loader`` (or of ``boot_transformers`` for a folder).

    Example:
        >>> ModelSource("/models/gpt2").describe()
        "folder '/models/gpt2'"
        >>> ModelSource(print, ("x",)).describe()
        'print(...)'
    """

    loader: Callable[..., Any] | str
    args: tuple[Any, ...] = attrs.field(default=(), converter=tuple)
    kwargs: Mapping[str, Any] = attrs.field(factory=dict, converter=dict)

    @classmethod
    def of(cls, value: Any) -> ModelSource:
        """A source from a :class:`ModelSource`, a folder path or a loader callable.

        Raises:
            OptionError: anything else.
        """
        if isinstance(value, ModelSource):
            return value
        if isinstance(value, str | Path):
            return cls(str(value))
        if callable(value):
            return cls(value)
        raise OptionError(
            f"model must be a folder path, a loader callable or a ModelSource, got "
            f"{type(value).__name__}"
        )

    @classmethod
    def from_model(cls, model: Any) -> ModelSource:
        """A source that gives workers the caller's ``model``: its local folder (booted with the
        same tokenizer and dtype), or the model itself, sent once per worker."""
        hf = getattr(model, "original_model", None)
        folder = getattr(getattr(hf, "config", None), "_name_or_path", None)
        if isinstance(folder, str) and (Path(folder) / "config.json").is_file():
            kwargs: dict[str, Any] = {}
            if getattr(model, "tokenizer", None) is not None:
                kwargs["tokenizer"] = model.tokenizer
            dtype = getattr(getattr(model, "cfg", None), "dtype", None)
            if isinstance(dtype, torch.dtype):
                kwargs["dtype"] = dtype
            return cls(folder, kwargs=kwargs)
        return cls(_shipped, (model,))

    def describe(self) -> str:
        """A short description for messages."""
        if isinstance(self.loader, str):
            return f"folder {self.loader!r}"
        return f"{getattr(self.loader, '__name__', type(self.loader).__name__)}(...)"

    def load(self) -> Any:
        """Load the model (on a worker)."""
        if isinstance(self.loader, str):
            from transformer_lens.model_bridge import TransformerBridge

            kwargs = {"device": worker_device(), **self.kwargs}
            model = TransformerBridge.boot_transformers(self.loader, *self.args, **kwargs)
        else:
            model = self.loader(*self.args, **self.kwargs)
        if hasattr(model, "eval"):
            model.eval()
        return model


@attrs.frozen(eq=False)
class Recipe:
    """Everything a worker needs to build a run's tasks again, scattered once per run.

    Attributes:
        origin: What the caller's run was built from.
        grids: ``(dims, shape)`` of each spec's grid, as the caller compiled it.
        expect: The caller's model fingerprint and tokens hash.
    """

    origin: Origin
    grids: tuple[tuple[tuple[str, ...], tuple[int, ...]], ...]
    expect: Mapping[str, str]


@attrs.define(eq=False)
class WorkerSweep:
    """A run rebuilt on a worker: its session (unpatched runs computed once) and a task per spec."""

    estimator: Estimator
    adapter: Any
    tasks: list[Task]

    @classmethod
    def build(cls, model: Any, recipe: Recipe, where: str) -> WorkerSweep:
        """Prepare the run on ``model`` and check it matches the caller's.

        Raises:
            ExecutorError: another model, tokens or grids than the caller's.
        """
        from patchspec import runner
        from patchspec.plan.grid import compile
        from patchspec.results import provenance

        origin = recipe.origin
        run = runner.prepare(
            model,
            origin.clean,
            origin.corrupted,
            origin.metric,
            options=origin.options,
            positions=origin.positions,
            reference=origin.reference,
        )
        session = run.session
        got = provenance(run.adapter, session.clean_tokens, session.corrupted_tokens)
        for key, what in (("model_fingerprint", "model weights"), ("tokens_sha256", "tokens")):
            if got.get(key) != recipe.expect.get(key):
                raise ExecutorError(
                    f"worker {where} has other {what} than the caller ({key} "
                    f"{got.get(key)} != {recipe.expect.get(key)}); give the executor a model "
                    "source that loads the caller's model: DaskExecutor(client, model=folder or "
                    "loader)"
                )
        grids = [run.add(compile(spec, run.sizes, positions=run.positions)) for spec in origin.specs]
        for spec, grid, (dims, shape) in zip(origin.specs, grids, recipe.grids, strict=True):
            if (grid.dims, grid.shape) != (dims, shape):
                raise ExecutorError(
                    f"worker {where} compiled spec {spec.label!r} to dims {grid.dims} of shape "
                    f"{grid.shape}; the caller has dims {dims} of shape {shape}"
                )
        tasks = []
        with run.adapter.exclusive():
            for spec, grid in zip(origin.specs, grids, strict=True):
                evaluate = runner.evaluator_for(run, grid)
                cells = np.arange(grid.n_cells, dtype=np.int64)
                tasks.append(Task(grid, cells, session, run.adapter, evaluate, spec.label))
        return cls(run.estimator, run.adapter, tasks)


class ModelPlugin(_WorkerPlugin):  # type: ignore[misc]
    """A worker plugin holding one model per worker, loaded on first use, and the sweeps
    rebuilt on it (see :class:`WorkerSweep`).

    Attributes:
        name: The plugin's name on the workers.
        source: How the model is loaded.
        loads: How many times this worker loaded the model (1 once it is loaded).
    """

    idempotent = True

    def __init__(self, name: str, source: ModelSource) -> None:
        self.name = name
        self.source = source
        self.loads = 0
        self.builds = 0
        self._model: Any = None
        self._sweeps: collections.OrderedDict[str, WorkerSweep] = collections.OrderedDict()
        self._lock: threading.Lock | None = None
        self._where = "?"

    def __getstate__(self) -> dict[str, Any]:
        return {"name": self.name, "source": self.source}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["name"], state["source"])  # type: ignore[misc]

    def setup(self, worker: Any) -> None:
        """Called by the worker when the plugin is registered (or the worker starts)."""
        self._lock = threading.Lock()
        self._where = str(getattr(worker, "address", "?"))

    def teardown(self, worker: Any) -> None:
        """Drop the model and sweeps."""
        self._model = None
        self._sweeps.clear()

    def sweep(self, token: str, recipe: Recipe) -> WorkerSweep:
        """The run ``token`` rebuilt on this worker's model (built once, kept for later chunks)."""
        lock = self._lock or threading.Lock()
        with lock:
            if self._model is None:
                self._model = self.source.load()
                self.loads += 1
            if token not in self._sweeps:
                self._sweeps[token] = WorkerSweep.build(self._model, recipe, self._where)
                self.builds += 1
                while len(self._sweeps) > KEEP_SWEEPS:
                    self._sweeps.popitem(last=False)
            self._sweeps.move_to_end(token)
            return self._sweeps[token]


@attrs.frozen
class Failed:
    """A patchspec error raised on a worker, returned rather than raised so that Dask does not
    retry what would fail the same way again."""

    error: PatchSpecError


def _hold(recipe: Recipe) -> Recipe:
    return recipe


def run_chunk(
    plugin: str,
    token: str,
    recipe: Recipe,
    index: int,
    cells: np.ndarray,
    start: int | None,
    first: int = 0,
) -> torch.Tensor | Failed:
    """Compute one chunk on this worker (the task Dask runs): the values, on the CPU."""
    from distributed import get_worker

    worker = get_worker()
    if plugin not in worker.plugins:
        return Failed(
            ExecutorError(
                f"worker {worker.address} has no model plugin {plugin!r}; was the plugin "
                "unregistered, or the cluster replaced under the client?"
            )
        )
    try:
        holder: ModelPlugin = worker.plugins[plugin]  # type: ignore[assignment]
        sweep = holder.sweep(token, recipe)
        task = attrs.evolve(sweep.tasks[index], cells=np.asarray(cells, dtype=np.int64))
        with sweep.adapter.exclusive():
            values = LocalExecutor().run(sweep.estimator, task, [Chunk(cells, start, first)], progress=False)
    except PatchSpecError as err:
        return Failed(err)
    return values.cpu()


def _cells(task: Task, cells: np.ndarray, most: int = 4) -> str:
    named = "; ".join(task.grid.describe(int(c)) for c in cells[:most])
    more = f"; and {len(cells) - most} more" if len(cells) > most else ""
    return f"{len(cells)} cells of {task.label!r}: {named}{more}"


_REGISTERED: dict[tuple[str, str], bool] = {}
_REGISTERED_LOCK = threading.Lock()


@attrs.define(eq=False)
class DaskExecutor:
    """Runs a sweep's chunks on the workers of a ``dask.distributed`` cluster (see the module
    docstring).

    Args:
        client: The ``dask.distributed.Client`` of the cluster.
        model: How workers load the model: a folder path, a loader callable, or a
            :class:`ModelSource` (a loader with arguments). Default: the folder the caller's
            model was booted from (same tokenizer and dtype), else the caller's model itself,
            sent once to each worker.
        retries: How many times Dask re-runs a chunk that raised (a patchspec error is not
            retried: it would fail again). Chunks of a worker that dies are re-run elsewhere
            regardless, up to ``distributed.scheduler.allowed-failures`` times.
        resources: Worker resources each chunk needs, e.g. ``{"GPU": 1}`` for workers started
            with ``--resources GPU=1``.

    Raises:
        OptionError: ``distributed`` is not installed, or ``client`` is not a Client.
    """

    name: ClassVar[str] = "dask"
    client: Any
    model: Any = None
    retries: int = attrs.field(default=2)
    resources: Mapping[str, float] | None = None
    _recipes: dict[str, Any] = attrs.field(factory=dict, init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        require_distributed()
        if not is_client(self.client):
            raise OptionError(
                f"DaskExecutor needs a dask.distributed.Client, got {type(self.client).__name__}"
            )
        if isinstance(self.retries, bool) or not isinstance(self.retries, int) or self.retries < 0:
            raise OptionError(f"retries must be an int >= 0, got {self.retries!r}")
        if self.model is not None:
            ModelSource.of(self.model)

    def plugin_for(self, adapter: Any) -> str:
        """Register the model plugin on the workers (once per client and model); its name."""
        if self.model is not None:
            source = ModelSource.of(self.model)
            from dask.base import tokenize

            key = tokenize(source.loader, source.args, sorted(source.kwargs.items()))
        else:
            source = ModelSource.from_model(adapter.model)
            key = adapter.fingerprint()["model_fingerprint"]
            if isinstance(source.loader, str):
                key += source.loader
        name = f"patchspec-model-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
        with _REGISTERED_LOCK:
            client_id = str(getattr(self.client, "id", id(self.client)))
            if (client_id, name) not in _REGISTERED:
                log.debug("registering %s (%s) on the workers", name, source.describe())
                self.client.register_plugin(ModelPlugin(name, source), name=name)
                _REGISTERED[(client_id, name)] = True
        return name

    def recipe(self, task: Task, origin: Origin) -> Any:
        """The run's :class:`Recipe` on the cluster (a future), sent once per run."""
        if origin.token not in self._recipes:
            from patchspec.plan.grid import compile
            from patchspec.results import provenance

            session = task.session
            expect = provenance(task.adapter, session.clean_tokens, session.corrupted_tokens)
            sizes = task.grid.sizes
            grids = []
            for i, spec in enumerate(origin.specs):
                grid = task.grid if i == origin.index else compile(spec, sizes, positions=task.grid.positions)
                grids.append((grid.dims, grid.shape))
            local = attrs.evolve(origin.options, executor=None, progress=False, store=None)
            recipe = Recipe(attrs.evolve(origin, index=0, options=local), tuple(grids), expect)
            self._recipes.clear()  # one run at a time: drop the previous run's recipe
            # A task rather than scattered data: the scheduler rebuilds it if every worker
            # holding it dies; each worker fetches it once.
            self._recipes[origin.token] = self.client.submit(
                _hold, recipe, key=f"patchspec-recipe-{origin.token[:12]}", pure=False
            )
        return self._recipes[origin.token]

    def run(
        self, estimator: Estimator, task: Task, chunks: Sequence[Chunk], *, progress: bool
    ) -> torch.Tensor:
        """The values of ``task.cells``, computed on the cluster, in order.

        Raises:
            OptionError: the task was built by hand (no :attr:`Task.origin` to rebuild it from).
            ExecutorError: a chunk kept killing workers, or a worker built another sweep.
            PatchSpecError: what the sweep raised on a worker.
        """
        distributed = require_distributed()
        from distributed.scheduler import KilledWorker

        origin = task.origin
        if origin is None:
            raise OptionError(
                "the dask executor rebuilds each task on its workers from what spec.run was "
                "given; this task was built by hand (run it with executor='local')"
            )
        if not chunks:
            return torch.empty(0)
        plugin = self.plugin_for(task.adapter)
        recipe = self.recipe(task, origin)
        futures = {}
        for i, chunk in enumerate(chunks):
            future = self.client.submit(
                run_chunk,
                plugin,
                origin.token,
                recipe,
                origin.index,
                chunk.cells,
                chunk.start,
                chunk.first,
                key=f"patchspec-chunk-{origin.token[:12]}-{origin.index}-{i}",
                retries=self.retries,
                resources=dict(self.resources) if self.resources else None,
                pure=False,
            )
            futures[future] = chunk
        bar: contextlib.AbstractContextManager[Progress]
        if task.progress is not None:
            bar = contextlib.nullcontext(task.progress)
        else:
            desc = f"patching {task.label} ({estimator.name}, dask)".replace("  ", " ")
            bar = Progress.open(progress, total=len(task.cells), desc=desc)
        parts: list[tuple[Chunk, torch.Tensor]] = []
        try:
            with bar as shown:
                for future in distributed.as_completed(list(futures)):
                    chunk = futures[future]
                    try:
                        values = future.result()
                    except KilledWorker as err:
                        raise ExecutorError(
                            f"a chunk of {_cells(task, chunk.cells)} killed every worker it "
                            f"was sent to ({err}); run those cells on their own, with a "
                            "smaller max_memory=, or on workers with more memory"
                        ) from None
                    except (CancelledError, distributed.client.FutureCancelledError) as err:
                        raise ExecutorError(
                            f"the cluster dropped a chunk of {_cells(task, chunk.cells)} ({err})"
                        ) from None
                    if isinstance(values, Failed):
                        raise values.error
                    values = values.to(task.adapter.device)
                    parts.append((chunk, values))
                    if task.on_chunk is not None:
                        task.on_chunk(chunk, values)
                    shown.update(len(chunk))
                    shown.chunks(task.label, len(parts), len(chunks))
        finally:
            if len(parts) < len(chunks):
                self.client.cancel(list(futures))
        return assemble(task, parts)

    def close(self) -> None:
        """Forget the scattered recipes (the model plugins stay on the workers)."""
        self._recipes.clear()

