"""The named options of the projection and curvature settings, in a module that imports nothing:
``SourceConfig`` declares its fields (and the command line its flags) from them without loading
torch."""

STRUCTURES = ("dense", "factored", "grouped")  # what a projection is made with; SourceConfig also takes "auto"
CURVATURE_MODES = ("exact", "sampled")  # SourceConfig also takes "auto": the task's default

# proj_structure="auto" (docs/settings.md, "Why the defaults"): dense up to this many attributed
# parameters, where the dense projection (p x k products per row) costs at most about four times
# the factored pass (GPT-2 shapes, k = 1024, one CPU thread: 2.0x at 36k parameters, 4.1x at
# 121k; 8.1x at 366k, 9.7x at 834k) and the factored one would lose 0.02-0.17 LDS.
AUTO_DENSE_MAX_PARAMS = 100_000  # benchmarks/results/auto-structure-2026-12-06.md
# ... and dense where the factorable weights are less than this share of the attributed
# parameters: the others are formed and projected densely either way.
AUTO_MIN_FACTORABLE_SHARE = 0.5
# Models with embedding tables keep the grouped projection up to this many attributed
# parameters: it costs 1.0-3.1x the factored pass from 36k to 9.6M parameters (GPT-2 shapes,
# k = 1024, one CPU thread; 2.7x at 9.6M) and scored 0.014-0.074 LDS above it on the LM scenarios.
AUTO_GROUPED_MAX_PARAMS = 10_000_000  # benchmarks/results/auto-structure-grouped-2026-12-06.md


def auto_structure(
    num_params: int,
    factorable_params: int,
    embeddings: bool = False,
    *,
    dense_max_params: int = AUTO_DENSE_MAX_PARAMS,
    grouped_max_params: int = AUTO_GROUPED_MAX_PARAMS,
    min_factorable_share: float = AUTO_MIN_FACTORABLE_SHARE,
) -> str:
    """The structure ``proj_structure="auto"`` resolves to for a model with ``num_params``
    attributed parameters, ``factorable_params`` of them in weights the factored projection
    can take (``nn.Linear``, ``nn.Embedding``, GPT-2 ``Conv1D``), and attributed embedding
    tables or not (``embeddings``).

    A model with embeddings (language models and other transformers) gets "grouped" (one i.i.d.
    matrix and one Hessian block per layer, docs/settings.md) up to ``grouped_max_params``; a
    model without gets "dense" up to ``dense_max_params``, where forming and projecting its
    per-example gradients is cheap. Either gets that structure at any size when its factorable
    weights are less than ``min_factorable_share`` of its parameters; "factored" otherwise."""
    formed = "grouped" if embeddings else "dense"
    limit = grouped_max_params if embeddings else dense_max_params
    if num_params <= limit or factorable_params < min_factorable_share * num_params:
        return formed
    return "factored"


def auto_curvature_blocks(structure: str, embeddings: bool) -> str:
    """What ``curvature_blocks="auto"`` resolves to: "layer" (one Hessian block per layer) for a
    model with embedding tables under a projection whose coordinates belong to layers
    ("factored", "grouped"), "full" otherwise. The blocks gain LDS on transformers and lose it
    on MLPs (docs/settings.md, "Why the defaults")."""
    return "layer" if embeddings and structure != "dense" else "full"
