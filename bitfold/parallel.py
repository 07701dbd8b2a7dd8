"""Where independent work runs: in this process, one item after another (the default), or over a Ray cluster.

Passes and tools hand independent work to ``current().map(fn, items, setup=..., shared=...)``:

- ``setup(shared)`` builds a worker's state once (an ONNX Runtime session, a solver); ``shared`` travels to each
  worker once, through Ray's object store, not once per item;
- ``fn(state, item)`` does one item; both must be importable module-level functions (Ray pickles them by name);
- results come back in item order, and items are drawn lazily (at most two per worker in flight), so a generator of
  large items (weights, Hessians) is never held whole.

``with executing(RayExecutor(address)):`` sends every ``map`` inside the block to Ray. The work itself is the same
code on the same inputs, so a run spread over workers computes what the serial run computes; the one difference is
the thread count a worker's kernels use (``worker_threads()``), which does not change their results for the work
handed out here (each item is reduced in one thread's order either way; the tests compare bit for bit).
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol

from bitfold.errors import BitfoldError

_threads: int | None = None  # set in a Ray worker: the cores it was given


def worker_threads() -> int | None:
    """Intra-op threads the current worker should use: None in the driver (all cores), the worker's CPUs in Ray."""
    return _threads


class Executor(Protocol):
    workers: int

    def map(self, fn: Callable[[Any, Any], Any], items: Iterable[Any], *, setup: Callable[[Any], Any] | None = None,
            shared: Any = None) -> Iterator[Any]: ...  # fmt: skip


class Serial:
    """Every item in this process, in order (the default executor)."""

    workers = 1

    def map(self, fn, items, *, setup=None, shared=None):
        state = setup(shared) if setup is not None else shared
        for item in items:
            result = fn(state, item)
            del item  # the item's arrays are not held while the caller works on the result
            yield result
            del result  # nor the result while the next item is worked on


_current: contextvars.ContextVar[Executor] = contextvars.ContextVar("bitfold_executor", default=Serial())


def current() -> Executor:
    """The executor ``map`` calls go to (``Serial`` unless inside ``executing``)."""
    return _current.get()


@contextlib.contextmanager
def executing(executor: Executor) -> Iterator[Executor]:
    """Send every ``current().map`` inside the block to ``executor``."""
    token = _current.set(executor)
    try:
        with executor if isinstance(executor, contextlib.AbstractContextManager) else contextlib.nullcontext():
            yield executor
    finally:
        _current.reset(token)


class _Worker:
    """A Ray actor: one worker's state, built once, and the items sent to it."""

    def __init__(self, setup, shared, threads: int) -> None:
        global _threads
        _threads = threads
        os.environ["OMP_NUM_THREADS"] = str(threads)
        import torch

        torch.set_num_threads(threads)
        self.state = setup(shared) if setup is not None else shared

    def run(self, fn, item):
        return fn(self.state, item)


class RayExecutor(contextlib.AbstractContextManager):
    """Items spread over ``workers`` Ray actors of ``threads`` CPUs each.

    ``address``: a running cluster (``"auto"``, ``"ray://head:10001"``); None starts a local one with this machine's
    cores, so it helps on one machine too. Connecting to a cluster ships the ``bitfold`` package to the workers
    (``runtime_env.py_modules``); its Python packages (onnxruntime, torch, ...) must be installed on the nodes.
    ``workers`` defaults to the cluster's CPUs divided by ``threads``.
    """

    def __init__(self, address: str | None = None, workers: int | None = None, threads: int = 1) -> None:
        try:
            import ray  # noqa: F401
        except ImportError:
            raise BitfoldError("--ray needs the ray package; install it with pip install 'bitfold[ray]'.") from None
        if workers is not None and workers < 1:
            raise BitfoldError(f"workers must be >= 1, got {workers}.")
        if threads < 1:
            raise BitfoldError(f"threads must be >= 1, got {threads}.")
        self.address, self.threads, self._workers = address, threads, workers
        self._started = False

    def __enter__(self) -> RayExecutor:
        import ray

        if not ray.is_initialized():
            options: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "logging_level": "ERROR"}
            if self.address:
                options["runtime_env"] = {"py_modules": [str(Path(__file__).parent)], "excludes": ["*.so", "__pycache__"]}
            try:
                ray.init(address=self.address, **options)
            except (ConnectionError, RuntimeError, ValueError) as e:
                raise BitfoldError(f"could not reach the Ray cluster at {self.address!r}: {e}.") from None
            self._started = True
        return self

    def __exit__(self, *exc) -> None:
        import ray

        if self._started:
            ray.shutdown()
            self._started = False

    @property
    def workers(self) -> int:
        import ray

        if self._workers is not None:
            return self._workers
        cpus = int(ray.cluster_resources().get("CPU", 1)) if ray.is_initialized() else os.cpu_count() or 1
        return max(1, cpus // self.threads)

    def map(self, fn, items, *, setup=None, shared=None):
        import ray

        if not ray.is_initialized():
            self.__enter__()
        actor = ray.remote(num_cpus=self.threads)(_Worker)
        ref = ray.put(shared)
        actors = [actor.remote(setup, ref, self.threads) for _ in range(self.workers)]
        try:
            yield from _ordered(actors, fn, iter(items))
        finally:
            for a in actors:
                ray.kill(a)


def _ordered(actors: list, fn, items: Iterator[Any]) -> Iterator[Any]:
    """Results of ``fn`` over ``items`` in item order, keeping at most two items per actor in flight."""
    import ray

    free = [a for a in actors for _ in range(2)]
    inflight: dict[Any, tuple[int, Any]] = {}
    done: dict[int, Any] = {}
    submitted = next_out = 0
    exhausted = False
    while True:
        while free and not exhausted:
            try:
                item = next(items)
            except StopIteration:
                exhausted = True
                break
            a = free.pop(0)
            inflight[a.run.remote(fn, item)] = (submitted, a)
            submitted += 1
        if not inflight:
            break
        ready, _ = ray.wait(list(inflight), num_returns=1)
        for r in ready:
            index, a = inflight.pop(r)
            done[index] = ray.get(r)
            free.append(a)
        while next_out in done:
            yield done.pop(next_out)
            next_out += 1
