"""Ground truth of the linear datamodeling score: retraining on random subsets, cached on disk.

M subsets, each a uniformly random ``round(fraction * N)`` of the N attributed training rows,
are drawn from a seeded generator. The user's ``retrain(train_indices, seed)`` is run R times
per subset with distinct seeds; the (M, R, n_query) measurements are kept, so that the noise
of their mean can be reported next to the score. One ground truth serves every attribution
method: compute it once (or load it from the cache) and pass it to
:func:`source_proj.evaluation.lds.linear_datamodeling_score` for each score matrix.

The cache is an ``.npz`` file holding the subset masks, the measurements and a key: a hash of
the :class:`LDSConfig`, N and a fingerprint of the training setup (by default a hash of the
pickled ``retrain`` callable, so changing its data or hyperparameters invalidates the cache;
pass ``setup_key`` to version code changes that pickling cannot see).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from source_proj.errors import InputError
from source_proj.evaluation.retraining import RetrainFn, RetrainJob, RetrainRunner
from source_proj.evaluation.stats import spearman

_CACHE_FORMAT = 1


@dataclass(frozen=True)
class LDSConfig:
    """How the LDS ground truth is sampled.

    Attributes:
        num_subsets: M, the number of random subsets (>= 3).
        fraction: alpha, the fraction of the N attributed rows each subset keeps, in (0, 1).
        repeats: R, retrainings per subset with distinct seeds (>= 1; >= 2 to report noise).
        seed: seed of the subset draws and of the retraining seeds.
    """

    num_subsets: int = 100
    fraction: float = 0.5
    repeats: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.num_subsets, bool) or not isinstance(self.num_subsets, int):
            raise TypeError(f"num_subsets must be an int, got {self.num_subsets!r}")
        if self.num_subsets < 3:
            raise InputError(f"num_subsets must be >= 3 for a rank correlation, got {self.num_subsets}")
        if not 0.0 < float(self.fraction) < 1.0:
            raise InputError(f"fraction must lie in (0, 1), got {self.fraction!r}")
        if isinstance(self.repeats, bool) or not isinstance(self.repeats, int) or self.repeats < 1:
            raise InputError(f"repeats must be a positive int, got {self.repeats!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise InputError(f"seed must be a non-negative int, got {self.seed!r}")

    def subset_size(self, num_train: int) -> int:
        """Rows kept per subset: ``round(fraction * num_train)``, at least 1 and below N."""
        size = int(round(self.fraction * num_train))
        if not 1 <= size < num_train:
            raise InputError(
                f"fraction {self.fraction} of {num_train} training rows leaves {size} rows per "
                "subset; need between 1 and N - 1"
            )
        return size


@dataclass(frozen=True)
class GroundTruthNoise:
    """How noisy the ground truth's per-subset means are (averaged over queries).

    Attributes:
        split_half_reliability: Spearman correlation, across subsets, of the means of two
            disjoint halves of the repeats, corrected to R repeats with the Spearman-Brown
            formula 2r / (1 + r); 1 means noise-free, 0 pure noise. Its square root roughly
            bounds the LDS any method can reach. NaN when R < 2.
        noise_to_signal: std of the per-subset mean due to retraining noise,
            sqrt(mean_subsets var_repeats / R), over the std of the means across subsets.
            NaN when R < 2.
    """

    split_half_reliability: float
    noise_to_signal: float


@dataclass(frozen=True)
class LDSGroundTruth:
    """Retraining measurements on random subsets.

    Attributes:
        masks: (M, N) bool, row m marks the training rows kept in subset m.
        measurements: (M, R, n_query) float64, measurement of each query after each retraining.
        key: the cache key of the setup that produced them.
    """

    masks: np.ndarray
    measurements: np.ndarray
    key: str

    def __post_init__(self) -> None:
        if self.masks.ndim != 2 or self.masks.dtype != np.bool_:
            raise InputError(f"masks must be a 2-D bool array, got {self.masks.dtype} {self.masks.shape}")
        if self.measurements.ndim != 3 or self.measurements.shape[0] != self.masks.shape[0]:
            raise InputError(
                f"measurements must be (M, R, n_query) with M = {self.masks.shape[0]}, "
                f"got {self.measurements.shape}"
            )

    @property
    def num_train(self) -> int:
        """N, the number of attributed training rows."""
        return self.masks.shape[1]

    @property
    def num_queries(self) -> int:
        """n_query, the number of measured queries."""
        return self.measurements.shape[2]

    @property
    def mean(self) -> np.ndarray:
        """(M, n_query) mean measurement over the R repeats."""
        return self.measurements.mean(axis=1)

    def noise(self) -> GroundTruthNoise:
        """Noise of the per-subset means; see :class:`GroundTruthNoise`."""
        return ground_truth_noise(self.measurements)


def ground_truth_noise(measurements: np.ndarray) -> GroundTruthNoise:
    """Noise summary of (M, R, n_query) measurements; see :class:`GroundTruthNoise`."""
    repeats = measurements.shape[1]
    if repeats < 2:
        return GroundTruthNoise(float("nan"), float("nan"))
    half = repeats // 2
    r = spearman(measurements[:, :half].mean(axis=1), measurements[:, half : 2 * half].mean(axis=1))
    r_half = float(np.nanmean(r))
    reliability = 2.0 * r_half / (1.0 + r_half) if r_half > -1.0 else float("nan")
    noise_std = np.sqrt(measurements.var(axis=1, ddof=1).mean(axis=0) / repeats)
    signal_std = measurements.mean(axis=1).std(axis=0, ddof=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = float(np.nanmean(np.where(signal_std > 0, noise_std / signal_std, np.nan)))
    return GroundTruthNoise(reliability, ratio)


def sample_subsets(num_train: int, config: LDSConfig) -> np.ndarray:
    """(M, N) bool masks of M seeded uniform subsets, each of ``config.subset_size(N)`` rows."""
    size = config.subset_size(num_train)
    rng = np.random.default_rng([config.seed, 0x1D5])
    masks = np.zeros((config.num_subsets, num_train), dtype=bool)
    for m in range(config.num_subsets):
        masks[m, rng.choice(num_train, size=size, replace=False)] = True
    return masks


def retrain_seeds(config: LDSConfig) -> np.ndarray:
    """(M, R) distinct int seeds for the retrainings, derived from ``config.seed``."""
    total = config.num_subsets * config.repeats
    seeds = np.random.default_rng([config.seed, 0x5EED]).choice(2**31 - 1, size=total, replace=False)
    return seeds.reshape(config.num_subsets, config.repeats)


def setup_fingerprint(retrain: RetrainFn) -> str:
    """sha256 of the pickled ``retrain`` callable (its class/function name and its data)."""
    try:
        payload = pickle.dumps(retrain)
    except (pickle.PicklingError, AttributeError, TypeError) as err:
        raise InputError(
            "retrain cannot be pickled, so the cache cannot tell when the setup changes; "
            "pass setup_key=... (a string naming the training setup) or use a module-level "
            "function or class"
        ) from err
    return hashlib.sha256(payload).hexdigest()


def cache_key(config: LDSConfig, num_train: int, setup_key: str) -> str:
    """sha256 naming one ground-truth setup: the config, N and the setup's fingerprint."""
    text = json.dumps(
        {"format": _CACHE_FORMAT, "config": asdict(config), "num_train": num_train, "setup": setup_key},
        sort_keys=True,
    )
    return hashlib.sha256(text.encode()).hexdigest()


def load_cached(path: str | os.PathLike, key: str) -> LDSGroundTruth | None:
    """The ground truth stored at ``path`` if it exists and carries ``key``, else None."""
    path = Path(path)
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as data:
        if not {"key", "masks", "measurements"} <= set(data.files) or str(data["key"]) != key:
            return None
        return LDSGroundTruth(masks=data["masks"], measurements=data["measurements"], key=key)


def save_cached(path: str | os.PathLike, truth: LDSGroundTruth) -> None:
    """Write ``truth`` to ``path`` (npz), atomically replacing any older file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(tmp, masks=truth.masks, measurements=truth.measurements, key=np.str_(truth.key))
    os.replace(tmp, path)


def compute_ground_truth(
    retrain: RetrainFn,
    num_train: int,
    config: LDSConfig = LDSConfig(),
    cache_path: str | os.PathLike | None = None,
    setup_key: str | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> LDSGroundTruth:
    """Retrain on M random subsets R times each, or load the result from ``cache_path``.

    Args:
        retrain: ``retrain(train_indices, seed) -> (n_query,)`` measurements of a model trained
            on the given rows (int64 indices into the N attributed rows, sorted) with the seed.
        num_train: N, the number of attributed training rows.
        config: subset count, fraction, repeats and seed.
        cache_path: npz file to read and write; None disables caching.
        setup_key: names the training setup in the cache key; by default a hash of the
            pickled ``retrain``.
        workers: retraining processes (None: all available cores; 1: serial).
        progress: show a progress bar.

    Returns:
        The ground truth; its ``key`` identifies the setup.
    """
    if isinstance(num_train, bool) or not isinstance(num_train, (int, np.integer)) or num_train < 2:
        raise InputError(f"num_train must be an int >= 2, got {num_train!r}")
    num_train = int(num_train)
    if cache_path is None and setup_key is None:
        key = ""
    else:
        key = cache_key(config, num_train, setup_key if setup_key is not None else setup_fingerprint(retrain))
    if cache_path is not None:
        cached = load_cached(cache_path, key)
        if cached is not None:
            return cached
    masks = sample_subsets(num_train, config)
    seeds = retrain_seeds(config)
    jobs = [
        RetrainJob(np.flatnonzero(masks[m]), int(seeds[m, r]))
        for m in range(config.num_subsets)
        for r in range(config.repeats)
    ]
    with RetrainRunner(retrain, workers=workers, progress=progress) as runner:
        results = runner.run(jobs, desc="LDS ground truth")
    sizes = {len(r) for r in results}
    if len(sizes) != 1:
        raise InputError(f"retrain returned measurement vectors of different lengths {sorted(sizes)}")
    measurements = np.stack(results).reshape(config.num_subsets, config.repeats, -1)
    truth = LDSGroundTruth(masks=masks, measurements=measurements, key=key)
    if cache_path is not None:
        save_cached(cache_path, truth)
    return truth
