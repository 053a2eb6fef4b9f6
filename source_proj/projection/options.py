"""The named options of the projection and curvature settings, in a module that imports nothing:
``SourceConfig`` declares its fields (and the command line its flags) from them without loading
torch."""

STRUCTURES = ("dense", "factored")
CURVATURE_MODES = ("exact", "sampled")  # SourceConfig also takes "auto": the task's default
