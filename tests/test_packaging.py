"""The checkout as a new user meets it: the top-level ``kernels`` name, and the lock file."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

tomllib = pytest.importorskip("tomllib")

ROOT = Path(__file__).resolve().parents[1]


def _run_in_root(code: str) -> subprocess.CompletedProcess:
    """``python -c code`` started in the repository root, which puts the root first on sys.path."""
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_transformers_kernels_integration_imports_from_the_repository_root() -> None:
    pytest.importorskip("transformers")
    try:
        installed = importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        installed = None
    done = _run_in_root(
        "import transformers.integrations.hub_kernels, kernels, source_proj.kernels.reference as r\n"
        "print(kernels.__file__); print(r.__file__)"
    )
    assert done.returncode == 0, done.stderr
    kernels_file, reference_file = (Path(line) for line in done.stdout.split())
    assert reference_file.resolve() == ROOT / "kernels" / "reference.py"  # through the source_proj/kernels link
    assert ROOT / "kernels" not in kernels_file.parents
    if installed is not None:
        assert kernels_file == Path(installed.locate_file("kernels/__init__.py"))


def test_the_kernels_folder_is_never_a_top_level_package() -> None:
    # Without any installed distribution of that name (site-packages left out of sys.path), the
    # import fails as it would outside the checkout, naming the package the folder really is.
    done = _run_in_root(
        "import sys\nsys.path = [p for p in sys.path if 'site-packages' not in p]\nimport kernels.reference"
    )
    assert done.returncode != 0
    assert "ModuleNotFoundError" in done.stderr and "source_proj.kernels" in done.stderr


def _lock() -> dict[str, Version]:
    pins = {}
    for line in (ROOT / "requirements-lock.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            requirement = Requirement(line)
            (spec,) = requirement.specifier
            assert spec.operator == "==", line
            pins[canonicalize_name(requirement.name)] = Version(spec.version)
    return pins


def test_the_lock_satisfies_every_range_of_pyproject() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = list(project["dependencies"]) + [r for extra in project["optional-dependencies"].values() for r in extra]
    pins = _lock()
    checked = 0
    for text in declared:
        requirement = Requirement(text)
        name = canonicalize_name(requirement.name)
        if name in pins:
            assert requirement.specifier.contains(pins[name], prereleases=True), f"lock {name}=={pins[name]} vs {text}"
            checked += 1
    # Every runtime and test dependency is pinned (the bench extra is installed on demand only).
    test_deps = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["test"]]
    missing = [r.name for r in test_deps if canonicalize_name(r.name) not in pins]
    assert not missing, f"not in requirements-lock.txt: {missing}"
    assert checked >= len(test_deps)



def test_the_package_root_is_the_public_api_and_imports_nothing_heavy() -> None:
    done = _run_in_root(
        "import sys, source_proj\n"
        "heavy = [m for m in ('torch', 'transformers', 'faiss', 'source_proj.cli') if m in sys.modules]\n"
        "missing = [n for n in source_proj.__all__ if getattr(source_proj, n, None) is None]\n"
        "print(heavy, missing)"
    )
    assert done.returncode == 0, done.stderr
    # Nothing heavy at import; every export resolves (importing it on first use).
    assert done.stdout.split() == ["[]", "[]"], done.stdout
