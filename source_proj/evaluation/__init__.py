"""Evaluation of attribution scores against retraining: LDS and subset-removal counterfactuals.

Both protocols take a user-supplied ``retrain(train_indices, seed) -> (n_query,) array`` that
trains a fresh model on the given training rows and returns one measurement per query (the
margin for classification). Scores follow the library's convention: ``scores[q, m] > 0`` means
including row m raises query q's measurement.

Modules: ``ground_truth`` (subset retraining, cached), ``lds`` (the score and its interval),
``counterfactual`` (subset removal), ``pruning`` (does dropping a curation ranking's top
rows help?), ``retraining`` (parallel runner), ``training`` (small SGD and AdamW trainers that
record a trajectory: the demo's and the retraining's), ``stats``; and, for
comparing estimators on the same projected gradients, ``projected_run``, ``baselines``
(TracIn, influence functions, TRAK, RepSim, SOURCE on a cached run) and ``scenarios`` (the
benchmark's scikit-learn setups).

Layer: above the attributor (it evaluates attributors and builds the runs they read), below
``curation`` (whose pruning benchmark retrains through it) and the command line.
"""

from source_proj.evaluation.counterfactual import (
    RANDOM_BASELINE,
    CounterfactualConfig,
    CounterfactualCurve,
    CounterfactualResult,
    subset_removal,
)
from source_proj.evaluation.ground_truth import (
    GroundTruthNoise,
    LDSConfig,
    LDSGroundTruth,
    compute_ground_truth,
)
from source_proj.evaluation.lds import LDSResult, linear_datamodeling_score
from source_proj.evaluation.pruning import PruningConfig, PruningResult, pruning_curve
from source_proj.evaluation.retraining import RetrainRunner

__all__ = [
    "RANDOM_BASELINE",
    "CounterfactualConfig",
    "CounterfactualCurve",
    "CounterfactualResult",
    "GroundTruthNoise",
    "LDSConfig",
    "LDSGroundTruth",
    "LDSResult",
    "PruningConfig",
    "PruningResult",
    "RetrainRunner",
    "compute_ground_truth",
    "linear_datamodeling_score",
    "pruning_curve",
    "subset_removal",
]
