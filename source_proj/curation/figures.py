"""Figures for curation (matplotlib, an optional extra: ``pip install 'source-proj[plot]'``).

- :func:`attribution_grid`: a query image with its top proponents and opponents (image data).
- :func:`score_histogram`: the distribution of a suspicion score (e.g. self-influence), the
  flagged tail drawn in another colour, the flag threshold marked.
- :func:`pruning_figure`: the change of the retrained metric against the removed fraction,
  one line per ranking, with its interval over seeds.

Each returns a ``matplotlib.figure.Figure`` (built without pyplot, so no display is needed);
save it with ``fig.savefig("name.png")``. matplotlib is imported only when one is called.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from source_proj.errors import InputError
from source_proj.evaluation.pruning import FULL, PruningResult


def _figure(width: float, height: float) -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError("figures need matplotlib: pip install 'source-proj[plot]' (or matplotlib)") from exc
    return Figure(figsize=(width, height), layout="constrained")


def _image(values: np.ndarray, shape: tuple[int, ...] | None) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if shape is not None:
        array = array.reshape(shape)
    if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3):
        array = np.moveaxis(array, 0, -1)  # channels first -> last
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3):
        raise InputError(f"cannot show an image of shape {array.shape}; pass image_shape")
    return array


def attribution_grid(
    query: np.ndarray,
    proponents: Sequence[np.ndarray],
    opponents: Sequence[np.ndarray],
    *,
    proponent_scores: Sequence[float] | None = None,
    opponent_scores: Sequence[float] | None = None,
    proponent_labels: Sequence[Any] | None = None,
    opponent_labels: Sequence[Any] | None = None,
    query_label: Any = None,
    image_shape: tuple[int, ...] | None = None,
    cmap: str = "gray_r",
) -> Any:
    """A query image beside two rows of training images: its top proponents (helped its
    prediction) and top opponents (hurt it), each captioned with its label and score.

    Images are arrays of shape (H, W), (H, W, C), (C, H, W), or flat with ``image_shape``.
    Returns a Figure with 1 + len(proponents) + len(opponents) image axes.
    """
    columns = max(len(proponents), len(opponents), 1)
    fig = _figure(1.4 * (columns + 1), 3.2)
    grid = fig.add_gridspec(2, columns + 1)
    ax = fig.add_subplot(grid[:, 0])
    ax.imshow(_image(query, image_shape), cmap=cmap)
    ax.set_title("query" if query_label is None else f"query\nlabel {query_label}", fontsize=9)
    ax.set_axis_off()
    for row, (name, images, scores, labels) in enumerate(
        (("proponent", proponents, proponent_scores, proponent_labels),
         ("opponent", opponents, opponent_scores, opponent_labels))
    ):
        for j, image in enumerate(images):
            ax = fig.add_subplot(grid[row, j + 1])
            ax.imshow(_image(image, image_shape), cmap=cmap)
            caption = [f"{name} {j + 1}"]
            if labels is not None:
                caption.append(f"label {labels[j]}")
            if scores is not None:
                caption.append(f"{scores[j]:+.3g}")
            ax.set_title("\n".join(caption), fontsize=8)
            ax.set_axis_off()
    return fig


def score_histogram(
    scores: np.ndarray, flags: np.ndarray, *, bins: int = 50, label: str = "self-influence", log: bool = True
) -> Any:
    """Histogram of ``scores`` (N,), the ``flags`` (N,) bool rows (the flagged tail) stacked
    in another colour, and a line at the flag threshold (the smallest flagged score).
    Returns a Figure with one axes whose two bar containers hold the unflagged and flagged
    counts per bin."""
    scores = np.asarray(scores, dtype=np.float64)
    flags = np.asarray(flags, dtype=bool)
    if scores.ndim != 1 or flags.shape != scores.shape:
        raise InputError(f"scores and flags must be 1-D of one length, got {scores.shape} and {flags.shape}")
    fig = _figure(6.0, 3.5)
    ax = fig.add_subplot()
    edges = np.histogram_bin_edges(scores, bins=bins)
    ax.hist([scores[~flags], scores[flags]], bins=edges, stacked=True, log=log,
            color=["tab:blue", "tab:red"], label=[f"kept ({(~flags).sum()})", f"flagged ({flags.sum()})"])
    if flags.any():
        ax.axvline(scores[flags].min(), color="black", linestyle="--", linewidth=1, label="flag threshold")
    ax.set_xlabel(label)
    ax.set_ylabel("training rows")
    ax.legend(fontsize=8)
    return fig


def pruning_figure(result: PruningResult, *, metric: int = 0, ylabel: str = "change of the metric") -> Any:
    """Mean change of the retrained metric (pruned minus unpruned, paired by seed) against
    the removed fraction, one line per ranking with its interval over seeds as error bars.
    Returns a Figure with one axes holding one errorbar container per ranking."""
    fig = _figure(6.0, 3.8)
    ax = fig.add_subplot()
    rows = [r for r in result.summary(metric) if r["ranking"] != FULL]
    for name in dict.fromkeys(r["ranking"] for r in rows):
        mine = [r for r in rows if r["ranking"] == name]
        x = 100 * np.array([r["fraction"] for r in mine])
        y = np.array([r["change"] for r in mine])
        err = np.array([[r["change"] - r["change_low"] for r in mine], [r["change_high"] - r["change"] for r in mine]])
        ax.errorbar(x, y, yerr=np.nan_to_num(err), marker="o", capsize=3, label=name)
    ax.axhline(0.0, color="gray", linewidth=0.8)
    ax.set_xlabel("training rows removed (%)")
    ax.set_ylabel(ylabel)
    ax.set_title(f"{int(100 * result.confidence)}% intervals over {len(result.seeds)} seeds", fontsize=9)
    ax.legend(fontsize=8)
    return fig
