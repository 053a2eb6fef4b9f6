"""Per-segment curvature in the projected space: spectra and the exp / phi operators (``spectra``)."""
