"""A feature store and exact top-k over many queries.

Featurises the training rows of ``mlp_from_tensors.py``'s run once into a zarr feature store
(resumable, checked on every read), then finds the top proponents of many queries from the
store, block by block with bounded memory. Writes the store and the queries' features (every
score is ``query_features @ features.T``) under the output directory.

    python examples/store_topk.py [OUTPUT_DIR]
    SOURCE_EXAMPLE_TINY=1 python examples/store_topk.py
"""

import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))  # mlp_from_tensors.py beside this file

from mlp_from_tensors import TINY, K, N, make_data, train  # noqa: E402

from source_proj import SourceAttributor  # noqa: E402

QUERIES = 64 if TINY else 2000


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp())
    out.mkdir(parents=True, exist_ok=True)
    x_train, y_train = make_data(N, seed=0)
    queries = make_data(QUERIES, seed=1)
    model, trajectory = train(x_train, y_train, tempfile.mkdtemp())
    attributor = SourceAttributor(model, "classification", trajectory, proj_dim=K, seed=0, progress=False)
    # A killed fit resumes where it stopped; a later run with another model, trajectory,
    # settings or data is refused instead of mixing features. use_store(path) reopens it.
    attributor.fit((x_train, y_train), store=out / "features.zarr", dtype="float32", chunk_rows=32)
    proponents = attributor.topk(queries, k=5, kind="proponents")
    np.save(out / "query_features.npy", attributor.query_features(queries).numpy())
    for q in range(QUERIES):
        print(f"query {q}: top proponents {proponents.ids[q].tolist()} (best score {float(proponents.scores[q, 0]):.3e})")


if __name__ == "__main__":
    main()
