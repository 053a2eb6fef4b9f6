"""Curation figures: what each draws equals the data it was given."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from source_proj.curation.figures import (  # noqa: E402
    attribution_grid,
    pruning_figure,
    score_histogram,
)
from source_proj.evaluation.pruning import PruningConfig, pruning_curve  # noqa: E402


def test_histogram_stacks_the_flagged_tail(tmp_path: Path) -> None:
    scores = np.random.default_rng(0).lognormal(size=500)
    flags = scores >= np.quantile(scores, 0.9)
    fig = score_histogram(scores, flags, bins=20)
    (ax,) = fig.axes
    kept_bars, flagged_bars = ax.containers
    edges = np.histogram_bin_edges(scores, bins=20)
    np.testing.assert_array_equal([b.get_height() for b in kept_bars], np.histogram(scores[~flags], edges)[0])
    stacked = np.histogram(scores[flags], edges)[0]  # drawn on top of the kept counts
    np.testing.assert_array_equal([b.get_height() for b in flagged_bars], stacked)
    np.testing.assert_allclose([b.get_y() for b in flagged_bars], np.histogram(scores[~flags], edges)[0])
    assert ax.lines[0].get_xdata()[0] == scores[flags].min()  # the threshold line
    fig.savefig(tmp_path / "hist.png")
    assert (tmp_path / "hist.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="one length"):
        score_histogram(scores, flags[:10])


def test_grid_shows_the_query_proponents_and_opponents() -> None:
    rng = np.random.default_rng(1)
    query = rng.random(64)
    pros, cons = [rng.random(64) for _ in range(3)], [rng.random(64) for _ in range(2)]
    fig = attribution_grid(query, pros, cons, proponent_scores=[0.5, 0.2, 0.1], opponent_scores=[-0.4, -0.3],
                           proponent_labels=[1, 1, 7], opponent_labels=[4, 9], query_label=1, image_shape=(8, 8))
    assert len(fig.axes) == 6
    shown = [ax.images[0].get_array() for ax in fig.axes]
    for got, image in zip(shown, [query, *pros, *cons]):
        np.testing.assert_array_equal(got, image.reshape(8, 8))
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[1] == "proponent 1\nlabel 1\n+0.5" and titles[5] == "opponent 2\nlabel 9\n-0.3"
    with pytest.raises(ValueError, match="pass image_shape"):
        attribution_grid(query, pros, cons)


def _metric(indices: np.ndarray, seed: int) -> float:
    return float(len(indices)) / 100 + seed % 7


def test_pruning_figure_plots_the_summary() -> None:
    result = pruning_curve(_metric, {"first": np.arange(100.0)}, 100, PruningConfig(fractions=(0.1, 0.2), num_seeds=3),
                           workers=1, progress=False)
    fig = pruning_figure(result)
    (ax,) = fig.axes
    lines = {c.get_label(): c for c in ax.containers}
    assert set(lines) == {"first", "random"}
    x, y = lines["first"].lines[0].get_data()
    np.testing.assert_allclose(x, [10, 20])
    np.testing.assert_allclose(y, [-0.1, -0.2], atol=1e-12)  # removing 10 / 20 rows of 100
