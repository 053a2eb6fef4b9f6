"""The digits demo: train a small MLP with SGD + momentum (or AdamW with warm-up + cosine),
then attribute test predictions.

``digits_run`` trains (or reloads) the model and returns everything attribution needs;
``run_demo`` prints, for a few test digits, the most helpful (proponent) and most harmful
(opponent) training digits with their labels and scores.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import torch
from torch import nn

from source_proj.errors import InputError
from source_proj.evaluation.training import AdamWSettings, TrainSettings, train
from source_proj.gradients.tasks import ClassificationTask
from source_proj.trajectory.checkpoints import Checkpoint, Trajectory

DIGITS_SETTINGS = TrainSettings(
    epochs=12, batch_size=32, lr=0.05, momentum=0.9, weight_decay=5e-4, checkpoints_per_epoch=1, seed=0
)
DIGITS_ADAMW_SETTINGS = AdamWSettings(
    epochs=12, batch_size=32, lr=3e-3, weight_decay=1e-2, warmup_fraction=0.1, checkpoints_per_epoch=1, seed=0
)
# --optimizer of the demo: (settings, checkpoint folder, description).
DEMO_OPTIMIZERS: dict[str, tuple[TrainSettings | AdamWSettings, str, str]] = {
    "sgd": (DIGITS_SETTINGS, "checkpoints", "SGD, momentum 0.9"),
    "adamw": (DIGITS_ADAMW_SETTINGS, "checkpoints-adamw", "AdamW, warm-up + cosine schedule"),
}


@dataclass(frozen=True)
class DigitsRun:
    """A trained digits classifier with its trajectory and data (inputs in [0, 1], 64 pixels)."""

    model: nn.Module
    trajectory: Trajectory
    train: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]


def digits_model(hidden: int = 32, seed: int = 0) -> nn.Module:
    """The demo's MLP: 64 -> hidden -> 10 with ReLU."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def digits_data(test_size: int = 297, seed: int = 0) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """scikit-learn's bundled digits (1797 images), shuffled and split into train and test."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x = torch.tensor(x, dtype=torch.float32)[perm] / 16.0
    y = torch.tensor(y)[perm]
    return (x[test_size:], y[test_size:]), (x[:test_size], y[:test_size])


def digits_run(checkpoint_dir: str | os.PathLike, settings: TrainSettings | AdamWSettings = DIGITS_SETTINGS) -> DigitsRun:
    """Train the demo model, saving checkpoints (and, for AdamW, optimizer states) under
    ``checkpoint_dir``, or reload them if a previous run with the same settings left them there."""
    train_rows, test_rows = digits_data()
    model = digits_model(seed=settings.seed)
    folder = Path(checkpoint_dir)
    manifest = folder / "trajectory.json"
    wanted = repr(settings)
    if manifest.exists() and json.loads(manifest.read_text()).get("settings") == wanted:
        entries = json.loads(manifest.read_text())["checkpoints"]
        ckpts = [
            Checkpoint(str(folder / e["file"]), e["steps"], e["lr"], e["stage"],
                       str(folder / e["optimizer_state"]) if e.get("optimizer_state") else None)
            for e in entries
        ]
        model.load_state_dict(torch.load(folder / entries[-1]["file"], weights_only=True))
    else:
        ckpts = train(model, ClassificationTask(), *train_rows, settings, checkpoint_dir=folder)
        # train() saved every state and optimizer state under checkpoint_dir: they are paths
        entries = [
            {"file": Path(cast(str, c.state)).name, "steps": c.steps, "lr": c.lr, "stage": c.stage,
             "optimizer_state": Path(cast(str, c.optimizer_state)).name if c.optimizer_state else None}
            for c in ckpts
        ]
        manifest.write_text(json.dumps({"settings": wanted, "checkpoints": entries}, indent=1))
    return DigitsRun(model.eval(), settings.trajectory(ckpts), train_rows, test_rows)


def run_demo(
    workdir: str | os.PathLike = "source-proj-demo",
    num_queries: int = 4,
    top: int = 5,
    proj_dim: int = 512,
    optimizer: str = "sgd",
    progress: bool = True,
    device: str | None = None,
) -> None:
    """Train on digits, featurise the training set into a feature store under ``workdir``
    (resumed or reused on later runs), and print proponents/opponents of ``num_queries`` test
    digits found with the faiss index, and the most self-influential training rows.

    ``optimizer``: "sgd" (SGD + momentum) or "adamw" (AdamW with warm-up + cosine; SOURCE
    then uses Adam's preconditioner from the saved optimizer states). ``progress`` and
    ``device`` are the attributor's run-time settings."""
    from source_proj.attributor import SourceAttributor
    from source_proj.features.store import FeatureStore
    from source_proj.retrieval.exact import exact_proponents_opponents
    from source_proj.store_fit import fit_store, open_store

    if optimizer not in DEMO_OPTIMIZERS:
        raise InputError(f"optimizer must be one of {sorted(DEMO_OPTIMIZERS)}, got {optimizer!r}")
    settings, folder, description = DEMO_OPTIMIZERS[optimizer]
    print(f"Training a 64-32-10 MLP on scikit-learn digits ({description}); checkpoints in {workdir}/{folder}/")
    run = digits_run(Path(workdir) / folder, settings)
    x_test, y_test = run.test
    with torch.no_grad():
        accuracy = (run.model(x_test).argmax(1) == y_test).float().mean().item()
    print(f"  {len(run.trajectory.checkpoints)} checkpoints, test accuracy {accuracy:.3f}")
    attributor = SourceAttributor(run.model, "classification", run.trajectory, proj_dim=proj_dim, seed=0,
                                  progress=progress, device=device)
    print(f"SOURCE: {attributor.num_segments} segments, projection to k={proj_dim} (Rademacher, seed 0)")
    tag = "" if optimizer == "sgd" else f"-{optimizer}"  # the SGD demo keeps its original file names
    path = Path(workdir) / f"features{tag}-k{proj_dim}.zarr"
    if path.exists() and FeatureStore.open(path).is_complete:
        store = open_store(attributor, path)
        print(f"  reusing the feature store {path}")
    else:
        store, _ = fit_store(attributor, run.train, path, chunk_rows=256)
        print(f"  training features written to the feature store {path} (an interrupted run resumes)")
    queries = (x_test[:num_queries], y_test[:num_queries])
    proponents, opponents = exact_proponents_opponents(
        store, attributor.query_features(queries).numpy(), top, progress=False
    )
    y_train = run.train[1]
    for q in range(num_queries):
        print(f"\nTest digit #{q} (label {int(y_test[q])}): score = predicted change of its margin if the row is kept")
        for name, found in (("proponents", proponents), ("opponents", opponents)):
            row = ", ".join(
                f"#{int(i)} (label {int(y_train[i])}, {float(v):+.4f})" for v, i in zip(found.scores[q], found.ids[q])
            )
            print(f"  top {name}: {row}")
    self_inf = torch.from_numpy(store.self_influence())
    values, ids = torch.topk(self_inf, top)
    print("\nMost self-influential training rows (candidates for mislabeled or atypical data):")
    print("  " + ", ".join(f"#{int(i)} (label {int(y_train[i])}, {float(v):.4f})" for v, i in zip(values, ids)))
    _save_grid(Path(workdir) / f"proponents-opponents{tag}.png", x_test[0], int(y_test[0]), run.train, proponents, opponents)


def _save_grid(path: Path, image: torch.Tensor, label: int, train: tuple, proponents, opponents) -> None:
    """Save the first query's proponent/opponent grid when matplotlib is installed."""
    try:
        from source_proj.curation.figures import attribution_grid

        x_train, y_train = train
        fig = attribution_grid(
            image.numpy(),
            [x_train[i].numpy() for i in proponents.ids[0]],
            [x_train[i].numpy() for i in opponents.ids[0]],
            proponent_scores=proponents.scores[0].tolist(),
            opponent_scores=opponents.scores[0].tolist(),
            proponent_labels=[int(y_train[i]) for i in proponents.ids[0]],
            opponent_labels=[int(y_train[i]) for i in opponents.ids[0]],
            query_label=label,
            image_shape=(8, 8),
        )
    except ImportError:
        print("\n(install matplotlib, pip install 'source-proj[plot]', for a picture of test digit #0's proponents)")
        return
    fig.savefig(path, dpi=120)
    print(f"\nTest digit #0 with its proponents and opponents: {path}")
