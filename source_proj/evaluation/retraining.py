"""Running a user-supplied retraining function many times, in worker processes when allowed.

The evaluation protocols (LDS ground truth, subset-removal counterfactuals) only need one
thing from the user: a callable ``retrain(train_indices, seed) -> measurements`` that trains a
fresh model on the given rows with the given seed and returns one measurement per query (shape
``(n_query,)``). :class:`RetrainRunner` runs lists of such jobs, in a process pool when more
than one worker is asked for (the callable must then be picklable: a module-level function or
an instance of a module-level class) and serially otherwise, with a progress bar.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from types import TracebackType

import numpy as np
from tqdm.auto import tqdm

from source_proj.errors import InputError

RetrainFn = Callable[[np.ndarray, int], np.ndarray]

# Thread-count variables set in each worker before the retraining callable is unpickled, so
# that k workers on k cores do not each start a full-width BLAS/OpenMP pool.
_THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")

_worker_retrain: RetrainFn | None = None


@dataclass(frozen=True)
class RetrainJob:
    """One retraining: the training rows (int64 indices, shape (n_kept,)) and the seed."""

    indices: np.ndarray
    seed: int


def available_cores() -> int:
    """Number of CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _init_worker(payload: bytes) -> None:
    for name in _THREAD_ENV:
        os.environ[name] = "1"
    global _worker_retrain
    _worker_retrain = pickle.loads(payload)
    torch = sys.modules.get("torch")  # set only when the callable (or __main__) pulled it in
    if torch is not None:
        torch.set_num_threads(1)


def _run_in_worker(indices: np.ndarray, seed: int) -> np.ndarray:
    assert _worker_retrain is not None, "worker was not initialised"
    return _worker_retrain(indices, seed)


def _check_measurement(value: object, job: RetrainJob) -> np.ndarray:
    out = np.asarray(value, dtype=np.float64)
    if out.ndim != 1:
        raise InputError(
            f"retrain(indices, seed={job.seed}) must return a 1-D array of per-query "
            f"measurements, got shape {out.shape}"
        )
    if not np.all(np.isfinite(out)):
        raise InputError(f"retrain(indices, seed={job.seed}) returned non-finite measurements")
    return out


class RetrainRunner:
    """Runs retraining jobs serially or in a pool of worker processes.

    Use as a context manager so the pool (started once, with the "spawn" method so that no
    thread state is forked) is shut down afterwards::

        with RetrainRunner(retrain, workers=2) as runner:
            results = runner.run(jobs, desc="ground truth")

    Args:
        retrain: ``retrain(train_indices, seed) -> (n_query,) array``.
        workers: number of processes; ``None`` uses every available core, 1 runs in this
            process. With more than one worker ``retrain`` must be picklable; if it is not, the
            runner falls back to serial execution.
        progress: show a tqdm progress bar.
    """

    def __init__(self, retrain: RetrainFn, workers: int | None = None, progress: bool = True):
        if not callable(retrain):
            raise TypeError(f"retrain must be callable, got {type(retrain).__name__}")
        if workers is not None and (isinstance(workers, bool) or workers < 1):
            raise InputError(f"workers must be None or a positive int, got {workers!r}")
        self.retrain = retrain
        self.workers = available_cores() if workers is None else int(workers)
        self.progress = progress
        self._executor: Executor | None = None

    def __enter__(self) -> RetrainRunner:
        if self.workers > 1:
            try:
                payload = pickle.dumps(self.retrain)
            except (pickle.PicklingError, AttributeError, TypeError):
                self.workers = 1  # not picklable: serial fallback
            else:
                self._executor = ProcessPoolExecutor(
                    max_workers=self.workers,
                    mp_context=multiprocessing.get_context("spawn"),
                    initializer=_init_worker,
                    initargs=(payload,),
                )
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=exc is not None)
            self._executor = None

    def run(self, jobs: Sequence[RetrainJob], desc: str = "retraining") -> list[np.ndarray]:
        """Run ``jobs`` and return their measurements in job order (each float64, (n_query,))."""
        bar = tqdm(total=len(jobs), desc=desc, disable=not self.progress or not jobs, leave=False)
        try:
            if self._executor is None:
                results = []
                for job in jobs:
                    results.append(_check_measurement(self.retrain(job.indices, job.seed), job))
                    bar.update()
                return results
            futures = {
                self._executor.submit(_run_in_worker, job.indices, job.seed): i
                for i, job in enumerate(jobs)
            }
            by_job: dict[int, np.ndarray] = {}
            for future in as_completed(futures):
                i = futures[future]
                by_job[i] = _check_measurement(future.result(), jobs[i])
                bar.update()
            return [by_job[i] for i in range(len(jobs))]
        finally:
            bar.close()
