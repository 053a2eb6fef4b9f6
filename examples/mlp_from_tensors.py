"""Attribute an MLP's predictions to its training rows, from plain tensors.

Trains a small MLP with SGD + momentum on synthetic data, saving a checkpoint every epoch,
describes that run as a ``Trajectory`` and prints, for each query, its most helpful training
row (top proponent), its most harmful one (top opponent) and the most self-influential rows.
``curation.py`` and ``store_topk.py`` reuse its data and training loop.

    python examples/mlp_from_tensors.py                          # 512 rows, k = 512
    SOURCE_EXAMPLE_TINY=1 python examples/mlp_from_tensors.py    # seconds
"""

import os
import tempfile

import torch

from source_proj import Checkpoint, SourceAttributor, Trajectory

TINY = os.environ.get("SOURCE_EXAMPLE_TINY") == "1"
N, EPOCHS, BATCH, K = (96, 4, 16, 64) if TINY else (512, 8, 32, 512)
LR, MOMENTUM = 0.1, 0.9


def make_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n rows of 10 features and a 3-class label that depends on four of them."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 10, generator=g)
    return x, (x[:, :3].sum(dim=1) > 0).long() + (x[:, 3] > 1).long()


def train(x: torch.Tensor, y: torch.Tensor, run_dir: str, epochs: int = EPOCHS) -> tuple[torch.nn.Module, Trajectory]:
    """Train an MLP with SGD + momentum, saving its weights after every epoch into ``run_dir``;
    returns the model and the run described as a trajectory."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    steps = len(x) // BATCH
    for epoch in range(epochs):
        order = torch.randperm(len(x))
        for b in range(steps):
            rows = order[b * BATCH:(b + 1) * BATCH]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[rows]), y[rows]).backward()
            opt.step()
        torch.save(model.state_dict(), f"{run_dir}/epoch-{epoch}.pt")
    # How the model was trained: checkpoints in order, the optimizer steps and learning rate
    # since the previous checkpoint, the optimizer and its momentum.
    trajectory = Trajectory(
        checkpoints=tuple(Checkpoint(f"{run_dir}/epoch-{e}.pt", steps=steps, lr=LR) for e in range(epochs)),
        optimizer="momentum", momentum=MOMENTUM,
    )
    return model, trajectory


def main() -> None:
    x_train, y_train = make_data(N, seed=0)
    x_query, y_query = make_data(8, seed=1)
    model, trajectory = train(x_train, y_train, tempfile.mkdtemp())
    attributor = SourceAttributor(model, "classification", trajectory, proj_dim=K, seed=0, progress=False)
    attributor.fit((x_train, y_train))
    scores = attributor.score((x_query, y_query))  # (queries, N); > 0: the row raised the query's margin
    proponents, opponents = attributor.topk((x_query, y_query), k=3)  # .ids, .scores, best first
    for q in range(len(x_query)):
        top = int(proponents.ids[q, 0])
        print(f"query {q} (label {int(y_query[q])}): top proponent row {top} (label {int(y_train[top])}, "
              f"score {float(scores[q, top]):.3e}), top opponent row {int(opponents.ids[q, 0])}")
    print("most self-influential rows:", attributor.self_influence().topk(5).indices.tolist())


if __name__ == "__main__":
    main()
