"""Per-segment curvature in the projected space: spectra and the exp / phi operators (``spectra``).

Layer: above ``projection`` (it works on projected Hessians) and ``trajectory`` (segments), below
``features`` (stores keep its eigendecompositions); it imports no gradient code."""
