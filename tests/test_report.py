"""``source-proj report``: the HTML page of a tiny Trainer run (text rows, rendered by a headless
Chromium where one is installed) and of an image task (rows as inline PNG images)."""

from __future__ import annotations

import base64
import io
import re
import shutil
import subprocess
import textwrap
import warnings

import numpy as np
import pytest
from test_cli_hf_run import SETTINGS, as_text, run  # noqa: F401  (run: the Trainer-run fixture)

from source_proj.cli.main import main

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# A result row of the report: rank, train id, score.
RESULT_ROW = re.compile(r'<tr><td>(\d+)</td><td>(\d+)</td><td class="score">([-+.\deE]+)</td>')


def _chromium(page, out_dir) -> str:
    """The DOM of ``page`` as headless Chromium builds it (a screenshot is saved in ``out_dir``)."""
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={out_dir / 'profile'}"]
    url = page.resolve().as_uri()
    subprocess.run([*flags, f"--screenshot={out_dir / 'report.png'}", "--window-size=1200,2000", url],
                   check=True, capture_output=True, timeout=120)
    assert (out_dir / "report.png").stat().st_size > 10_000  # a page was drawn, not a blank error tab
    return subprocess.run([*flags, "--dump-dom", url], check=True, capture_output=True, text=True, timeout=120).stdout


def test_report_of_a_trainer_run_shows_queries_proponents_scores_and_curation(run, tmp_path, capsys):  # noqa: F811
    from lm_helpers import tiny_gpt2

    from source_proj.attributor import SourceAttributor
    from source_proj.gradients.causal_lm import CausalLMTask
    from source_proj.trajectory.hf_trainer import trainer_trajectory

    root, train, queries = run
    files = ["--run", str(root / "run"), "--train", str(root / "train.jsonl")]
    store, page, curation = str(tmp_path / "feats.zarr"), tmp_path / "report.html", tmp_path / "curation"
    assert main(["fit", *files, "--store", store, "--quiet", *SETTINGS]) == 0
    assert main(["curate", *files, "--store", store, "--quiet", "--out", str(curation)]) == 0
    assert main(["report", *files, "--queries", str(root / "queries.jsonl"), "--store", store, "--quiet", "-k", "3",
                 "--curation", str(curation), "-o", str(page)]) == 0
    capsys.readouterr()
    model = tiny_gpt2()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trajectory = trainer_trajectory(root / "run", model=model)
    att = SourceAttributor(model, CausalLMTask(reduction="mean"), trajectory, proj_dim=32, num_segments=2,
                           progress=False).fit({"input_ids": train})
    scores = att.score({"input_ids": queries})
    document = page.read_text()
    assert "http://" not in document and "https://" not in document  # self-contained
    if CHROMIUM is None:
        dom = document
    else:
        dom = _chromium(page, tmp_path)
    blocks = dom.split("<h3>query ")[1:]
    assert len(blocks) == len(queries)
    for q, block in enumerate(blocks):
        assert as_text(queries[q]) in block  # the query's tokens decoded
        proponents = block.split("<h4>opponents</h4>")[0]
        shown = [(int(m), float(s)) for _, m, s in RESULT_ROW.findall(proponents)]
        assert [m for m, _ in shown] == scores[q].argsort(descending=True)[:3].tolist()
        for m, s in shown:
            assert s == pytest.approx(float(scores[q, m]), rel=1e-3, abs=1e-6)  # printed with 4 digits
            assert as_text(train[m]) in proponents
    assert "self-influence histogram" in dom and "curation.csv" not in dom
    assert "<th>flag</th>" in dom and str(curation) in dom
    if CHROMIUM is None:
        pytest.skip("no chromium on PATH (apt-get install -y chromium): the page was checked as written, not rendered")


IMAGE_TASK = textwrap.dedent(
    """
    import torch
    from source_proj.cli.task_spec import TaskSpec
    from source_proj.trajectory.checkpoints import Checkpoint, Trajectory

    def task():
        gen = torch.Generator().manual_seed(0)
        torch.manual_seed(0)  # the same model (and checkpoints) every call
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
        states = []
        for _ in range(2):
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.1 * torch.randn(p.shape, generator=gen))
            states.append({k: v.clone() for k, v in model.state_dict().items()})
        trajectory = Trajectory(tuple(Checkpoint(s, steps=2, lr=0.1) for s in states))
        x = torch.rand(8, 1, 3, 4, generator=gen)
        return TaskSpec(model=model, task="classification", trajectory=trajectory,
                        train=(x, torch.arange(8) % 3), queries=(x[:2] + 0.01, torch.tensor([0, 1])),
                        config={"proj_dim": 16, "num_segments": 1})
    """
)


def test_image_rows_are_inline_png_images_of_their_pixels(tmp_path, capsys):
    from PIL import Image

    path = tmp_path / "images.py"
    path.write_text(IMAGE_TASK)
    ref, store, page = f"{path}:task", str(tmp_path / "img.zarr"), tmp_path / "report.html"
    assert main(["fit", "--task", ref, "--store", store, "--quiet"]) == 0
    assert main(["report", "--task", ref, "--store", store, "--quiet", "-k", "2", "-o", str(page)]) == 0
    capsys.readouterr()
    from source_proj.cli.task_spec import load_task

    spec = load_task(ref)
    document = page.read_text()
    query_block = document.split("<h3>query 0</h3>")[1].split("<h4>")[0]
    uri = re.search(r'src="data:image/png;base64,([^"]+)"', query_block).group(1)
    decoded = np.asarray(Image.open(io.BytesIO(base64.b64decode(uri))))
    pixels = spec.queries[0][0, 0].numpy().astype(np.float64)
    expected = np.round((pixels - pixels.min()) / (pixels.max() - pixels.min()) * 255)
    assert decoded.shape == (3, 4) and np.abs(decoded - expected).max() == 0
    assert "<b>0</b>" in query_block  # its label
    assert len(re.findall(r'src="data:image/png;base64,', document)) == 2 * (1 + 2 * 2) + 8  # queries, results, top self-influence
