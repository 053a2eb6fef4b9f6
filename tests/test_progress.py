"""Progress bars: one per pass by default; the bars nested inside a pass only with verbose."""

import pytest
from tiny_models import trained_classifier

from source_proj.attributor import SourceAttributor


@pytest.mark.parametrize("verbose", [False, True])
def test_one_bar_per_pass_unless_verbose(capsys, verbose):
    model, trajectory, (x, y) = trained_classifier(n=24)
    attributor = SourceAttributor(model, "classification", trajectory, proj_dim=8, num_segments=2, chunk_size=8,
                                  verbose=verbose)
    attributor.fit((x, y))
    attributor.score((x[:2], y[:2]))
    shown = capsys.readouterr().err
    for bar in ("curvature:", "features:", "queries:"):
        assert bar in shown
    assert ("curvature @ checkpoint" in shown) == verbose
