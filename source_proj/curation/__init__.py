"""Dataset curation: find mislabeled and harmful training rows, then drop or down-weight them.

    from source_proj.curation import CurationConfig, curate, final_losses, query_set_harm

    table = curate(
        self_influence=store.self_influence(),                   # memorisation
        losses=final_losses(attributor, train),                  # -> held-out loss
        harm=query_set_harm(attributor, store, validation),      # harm to a trusted set
        labels=train_labels,
        config=CurationConfig(flag_fraction=0.05),
    )
    table.write("curation.csv")                  # or .parquet (needs pyarrow)
    write_curation(table, "out/")                # table, keep.npy, weights.npy: all or none
    keep = table.keep_mask()                     # (N,) bool, for a Subset
    weights = table.weights()                    # (N,) for WeightedRandomSampler / loss weights

Modules: ``settings`` (``CurationConfig``), ``ranking`` (scores, ranks, flags, weights; pure
functions), ``table`` (``CurationTable``), ``signals`` (losses, harm to a query set and the
queries one row helps and hurts, from an attributor and its store), ``figures`` (matplotlib,
optional), ``outputs`` (the three files written together, all or none).
``source_proj.evaluation.pruning`` checks by retraining that acting on a ranking helps.

Layer: above the attributor, ``retrieval`` and ``evaluation``; only the command line is above it.
"""

from source_proj.curation.outputs import write_curation, write_together
from source_proj.curation.ranking import (
    curate,
    percentile_ranks,
    ranks,
    row_weights,
    suspicion_scores,
)
from source_proj.curation.settings import RANKINGS, CurationConfig
from source_proj.curation.signals import (
    RowEffects,
    final_losses,
    query_set_harm,
    row_effects,
    training_labels,
)
from source_proj.curation.table import CurationTable

__all__ = [
    "RANKINGS",
    "CurationConfig",
    "CurationTable",
    "RowEffects",
    "curate",
    "final_losses",
    "percentile_ranks",
    "query_set_harm",
    "ranks",
    "row_effects",
    "row_weights",
    "suspicion_scores",
    "training_labels",
    "write_curation",
    "write_together",
]
