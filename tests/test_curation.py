"""Curation: rankings, flags, weights and tables against explicit formulas; planted flipped labels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import hypergeom, rankdata
from tiny_models import mlp
from torch.utils.data import WeightedRandomSampler

from source_proj.attributor import SourceAttributor
from source_proj.curation import (
    CurationConfig,
    CurationTable,
    curate,
    final_losses,
    ranks,
    row_weights,
    suspicion_scores,
    training_labels,
)
from source_proj.evaluation.training import TrainSettings, train_sgd
from source_proj.gradients.tasks import ClassificationTask


def _signals(n: int = 40, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"self_influence": rng.gamma(1.0, size=n), "losses": rng.gamma(2.0, size=n), "harm": rng.standard_normal(n)}


def test_rankings_are_the_documented_formulas() -> None:
    s = _signals()
    held = s["losses"] + s["self_influence"]
    for rank_by, expected in (
        ("self_influence", s["self_influence"]),
        ("heldout_loss", held),
        ("harm", s["harm"]),
        ("combined", 0.7 * rankdata(held) / 40 + 0.3 * rankdata(s["harm"]) / 40),
    ):
        score, ranking, signals = suspicion_scores(CurationConfig(rank_by=rank_by, harm_weight=0.3), **s)
        assert ranking == rank_by
        np.testing.assert_allclose(score, expected, rtol=1e-12)
        np.testing.assert_allclose(signals["heldout_loss"], held, rtol=1e-12)
    # auto: the richest ranking the given signals allow
    assert suspicion_scores(CurationConfig(), **s)[1] == "combined"
    assert suspicion_scores(CurationConfig(), self_influence=s["self_influence"], losses=s["losses"])[1] == "heldout_loss"
    assert suspicion_scores(CurationConfig(), self_influence=s["self_influence"])[1] == "self_influence"
    assert suspicion_scores(CurationConfig(), harm=s["harm"])[1] == "harm"
    # losses alone are no row signal (they crashed "combined" with a TypeError): auto ranks by harm
    score, ranking, _ = suspicion_scores(CurationConfig(), losses=s["losses"], harm=s["harm"])
    assert ranking == "harm"
    np.testing.assert_allclose(score, s["harm"], rtol=1e-12)
    with pytest.raises(ValueError, match=r"needs \['losses'\]"):
        suspicion_scores(CurationConfig(rank_by="heldout_loss"), self_influence=s["self_influence"])
    with pytest.raises(ValueError, match=r"losses must be a non-empty 1-D array of shape \(40,\)"):
        suspicion_scores(CurationConfig(), self_influence=s["self_influence"], losses=s["losses"][:5])
    bad = s["harm"].copy()
    bad[[3, 7]] = np.nan
    with pytest.raises(ValueError, match=r"harm has non-finite values at rows \[3, 7\]"):
        suspicion_scores(CurationConfig(), harm=bad)


def test_ranks_flags_and_weights() -> None:
    scores = np.array([0.5, 3.0, 3.0, -1.0, 10.0, 2.0, 0.0, 1.0, 4.0, 0.2])
    np.testing.assert_array_equal(ranks(scores), [7, 3, 4, 10, 1, 5, 9, 6, 2, 8])  # ties: lower row first
    table = curate(harm=scores, config=CurationConfig(flag_fraction=0.3, weight_floor=0.1, weight_width=0.5))
    np.testing.assert_array_equal(table.flagged(), [4, 8, 1])
    np.testing.assert_array_equal(table.keep_mask(), ~np.isin(np.arange(10), [4, 8, 1]))
    # threshold = largest score below every flagged one (2.0, row 5: row 2's 3.0 ties flagged
    # row 1, which would keep weight 1); spread = 1.4826 * MAD
    spread = 1.4826 * np.median(np.abs(scores - np.median(scores)))
    expected = np.ones(10)
    for row in (4, 8, 1):
        expected[row] = np.clip(1 - (scores[row] - 2.0) / (0.5 * spread), 0.1, 1.0)
    np.testing.assert_allclose(table.weights(), expected, rtol=1e-12)
    assert table.weights()[4] == table.weights()[8] == 0.1 and 0.1 < table.weights()[1] < 1
    # All scores tied: no threshold below the flagged row, which gets the floor.
    np.testing.assert_allclose(row_weights(np.zeros(4), np.array([1, 0, 0, 0], bool), 0.0, 1.0), [0, 1, 1, 1])


@pytest.mark.parametrize(
    "settings, message",
    [({"rank_by": "loss"}, "rank_by must be one of"), ({"flag_fraction": 0.0}, r"flag_fraction must be a number in \(0, 1\]"),
     ({"harm_weight": 1.5}, "harm_weight"), ({"weight_width": 0}, "weight_width must be finite and > 0")],
)
def test_config_rejects_bad_settings(settings: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CurationConfig(**settings)


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_table_round_trips_through_files(tmp_path: Path, suffix: str) -> None:
    s = _signals(n=57, seed=3)
    labels = np.random.default_rng(1).integers(0, 10, 57)
    table = curate(**s, labels=labels, config=CurationConfig(flag_fraction=0.2, weight_floor=0.05))
    path = table.write(tmp_path / f"table{suffix}")
    back = CurationTable.read(path)
    assert list(back.columns) == list(table.columns)
    for name, values in table.columns.items():
        np.testing.assert_array_equal(back.column(name), values, err_msg=name)  # floats exactly
    records = table.to_records()
    assert [r["rank"] for r in records] == list(range(1, 58)) and records[0]["row_id"] == int(np.argmax(table.column("score")))
    if suffix == ".csv":
        assert path.read_text().splitlines()[1].split(",")[0] == str(records[0]["row_id"])  # most suspicious first


def test_weights_drive_a_weighted_sampler() -> None:
    table = curate(harm=np.arange(100.0), config=CurationConfig(flag_fraction=0.1, weight_width=1e-6))
    sampler = WeightedRandomSampler(torch.as_tensor(table.weights()), num_samples=5000, generator=torch.Generator().manual_seed(0))
    drawn = np.fromiter(sampler, dtype=np.int64)
    assert set(drawn) <= set(np.flatnonzero(table.keep_mask()))  # weight 0: never drawn
    assert len(set(drawn)) == 90


def test_planted_flipped_labels_are_flagged() -> None:
    """150 rows in 3 well-separated clusters, 15 labels flipped; an MLP trained until it has
    memorised them (12 epochs) and one stopped early (4 epochs). The flagged 10% must hold
    at least 80% of the flipped rows (random flagging: 10% on average); the hypergeometric
    chance of that many hits from random flagging is below 1e-12."""
    gen = torch.Generator().manual_seed(0)
    y = torch.arange(150) % 3
    x = 3.0 * torch.randn(3, 6, generator=gen)[y] + torch.randn(150, 6, generator=gen)
    rng = np.random.default_rng(0)
    flipped = np.zeros(150, dtype=bool)
    flipped[rng.choice(150, 15, replace=False)] = True
    noisy = y.clone()
    noisy[torch.from_numpy(flipped)] = (noisy[torch.from_numpy(flipped)] + torch.from_numpy(rng.integers(1, 3, 15))) % 3
    for epochs in (4, 12):
        model = mlp((6, 16, 3), 0)
        settings = TrainSettings(epochs=epochs, batch_size=25, lr=0.1, momentum=0.9, weight_decay=1e-3, seed=0)
        trajectory = settings.trajectory(train_sgd(model, ClassificationTask(), x, noisy, settings))
        attributor = SourceAttributor(model, "classification", trajectory, proj_dim=32, chunk_size=256, progress=False)
        attributor.fit((x, noisy))
        losses = final_losses(attributor, (x, noisy), progress=False)
        np.testing.assert_allclose(losses, ClassificationTask().loss(model(x), noisy).detach().double().numpy(), rtol=1e-5)
        for rank_by in ("self_influence", "heldout_loss"):
            table = curate(self_influence=attributor.self_influence().numpy(), losses=losses,
                           labels=training_labels((x, noisy)), config=CurationConfig(rank_by=rank_by, flag_fraction=0.1))
            hits = int(flipped[table.flagged()].sum())
            assert hits >= 12, f"{rank_by}, {epochs} epochs: {hits} of 15 flipped rows flagged"
            assert hypergeom.sf(hits - 1, 150, 15, 15) < 1e-12
            np.testing.assert_array_equal(table.column("label"), noisy.numpy())
