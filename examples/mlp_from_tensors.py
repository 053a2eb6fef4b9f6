"""Attribute an MLP's predictions to its training rows, from plain tensors.

Trains a small MLP with SGD + momentum on synthetic data, saving a checkpoint every epoch,
describes that run as a ``Trajectory`` and prints, for each query, its most helpful training
row (top proponent) and the most self-influential rows.

    python examples/mlp_from_tensors.py            # 512 rows, k = 512
    SOURCE_EXAMPLE_TINY=1 python examples/mlp_from_tensors.py   # seconds
"""

import os
import tempfile

import torch

from source_proj import Checkpoint, SourceAttributor, Trajectory

TINY = os.environ.get("SOURCE_EXAMPLE_TINY") == "1"
N, EPOCHS, BATCH, K = (96, 4, 16, 64) if TINY else (512, 8, 32, 512)

torch.manual_seed(0)
x = torch.randn(N + 8, 10)
y = (x[:, :3].sum(dim=1) > 0).long() + (x[:, 3] > 1).long()  # 3 classes
x_train, y_train, x_query, y_query = x[:N], y[:N], x[N:], y[N:]
model = torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))

# Train, saving the weights after every epoch: these files are the trajectory.
run_dir = tempfile.mkdtemp()
opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
steps = N // BATCH
for epoch in range(EPOCHS):
    order = torch.randperm(N)
    for b in range(steps):
        rows = order[b * BATCH:(b + 1) * BATCH]
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x_train[rows]), y_train[rows]).backward()
        opt.step()
    torch.save(model.state_dict(), f"{run_dir}/epoch-{epoch}.pt")

trajectory = Trajectory(
    checkpoints=tuple(Checkpoint(f"{run_dir}/epoch-{e}.pt", steps=steps, lr=0.1) for e in range(EPOCHS)),
    optimizer="momentum", momentum=0.9,
)
attributor = SourceAttributor(model, "classification", trajectory, proj_dim=K, seed=0)
attributor.fit((x_train, y_train))
scores = attributor.score((x_query, y_query))  # (queries, N); > 0: the row raised the query's margin
proponents, opponents = attributor.topk((x_query, y_query), k=3)  # .ids, .scores, best first
for q in range(len(x_query)):
    print(f"query {q}: top proponent row {proponents.ids[q, 0]} (score {proponents.scores[q, 0]:.3e}), "
          f"top opponent row {opponents.ids[q, 0]}")
print("most self-influential rows:", attributor.self_influence().topk(5).indices.tolist())
