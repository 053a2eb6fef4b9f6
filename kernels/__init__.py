"""Random-projection kernels, installed as ``source_proj.kernels``.

``reference`` defines the random matrix (a pure function of seed, row and column) and computes
it on the CPU; ``cpu_projection`` multiplies gradients by it on the CPU, tile by tile;
``triton_projection`` generates the very same matrix on the fly inside a Triton kernel. See
``reference`` for the exact layout.
"""

# This folder is the package ``source_proj.kernels`` (pyproject's package-dir maps it there) and
# must never be the top-level package ``kernels``: that name belongs to a PyPI distribution
# which transformers imports (``transformers.integrations.hub_kernels``). Python puts the
# working directory first on ``sys.path`` for ``python -m ...``, ``python -c`` and the REPL, so
# in a checkout ``import kernels`` would find this folder before the installed distribution.
# The folder keeps its ``__init__.py`` (setuptools' editable install maps a package only to a
# folder that has one), so the clash is removed here, where it arises: imported under any other
# name, this module finds the module of that name on ``sys.path`` without the checkout's root,
# puts it in ``sys.modules`` in its own place (the import system returns what ``sys.modules``
# holds once a module has run) and never defines anything itself. With no such distribution
# installed, ``import kernels`` fails as it would outside the checkout.
if __name__ != "source_proj.kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
    _path = [entry for entry in sys.path if os.path.realpath(entry or os.curdir) != _root]
    _spec = importlib.machinery.PathFinder.find_spec(__name__, _path)
    if _spec is None or _spec.loader is None:
        raise ModuleNotFoundError(f"No module named {__name__!r} (the folder {os.path.dirname(__file__)} is "
                                  "the package source_proj.kernels, not a top-level package)", name=__name__)
    _module = importlib.util.module_from_spec(_spec)
    sys.modules[__name__] = _module
    _spec.loader.exec_module(_module)
