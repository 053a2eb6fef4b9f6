"""Find mislabeled training rows, drop them and retrain.

Flips the labels of 10% of the training rows of ``mlp_from_tensors.py``'s data, trains,
ranks the rows with ``source_proj.curation.curate`` (held-out loss: each row's final loss plus
its SOURCE self-influence), drops the flagged ones and retrains on the rest. Prints how many of
the flagged rows were flipped, and the test accuracy before and after.

    python examples/curation.py
    SOURCE_EXAMPLE_TINY=1 python examples/curation.py
"""

import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))  # mlp_from_tensors.py beside this file

from mlp_from_tensors import EPOCHS, TINY, K, make_data, train  # noqa: E402

from source_proj import SourceAttributor  # noqa: E402
from source_proj.curation import CurationConfig, curate, final_losses  # noqa: E402

FLIPPED = 0.1
N = 300 if TINY else 1000  # enough rows that 10% flipped labels cannot be memorised for free


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(dim=1) == y).double().mean())


def main() -> None:
    x_train, y_train = make_data(N, seed=0)
    x_test, y_test = make_data(1000, seed=2)
    rng = np.random.default_rng(0)
    flipped = rng.choice(N, size=int(FLIPPED * N), replace=False)
    y_noisy = y_train.clone()
    y_noisy[flipped] = (y_train[flipped] + torch.from_numpy(rng.integers(1, 3, len(flipped)))) % 3

    # Trained long enough to fit its wrong labels, where the loss alone stops finding them.
    model, trajectory = train(x_train, y_noisy, tempfile.mkdtemp(), epochs=3 * EPOCHS)
    attributor = SourceAttributor(model, "classification", trajectory, proj_dim=K, seed=0, progress=False)
    attributor.fit((x_train, y_noisy))
    table = curate(
        self_influence=attributor.self_influence().numpy(),
        losses=final_losses(attributor, (x_train, y_noisy), progress=False),
        labels=y_noisy.numpy(),
        config=CurationConfig(flag_fraction=FLIPPED),  # rank_by="auto": the held-out loss here
    )
    keep = table.keep_mask()
    caught = np.intersect1d(np.flatnonzero(~keep), flipped).size
    print(f"flagged {int((~keep).sum())} rows, {caught} of them among the {len(flipped)} flipped")

    retrained, _ = train(x_train[keep], y_noisy[keep], tempfile.mkdtemp(), epochs=3 * EPOCHS)
    print(f"test accuracy: {accuracy(model, x_test, y_test):.3f} on all rows, "
          f"{accuracy(retrained, x_test, y_test):.3f} without the flagged rows")


if __name__ == "__main__":
    main()
