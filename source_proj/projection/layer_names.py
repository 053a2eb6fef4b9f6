"""Which layer a parameter belongs to, from its name alone: the unit of the per-layer
projections (``projection.grouped``) and of the block-diagonal curvature."""

from __future__ import annotations

from collections.abc import Iterable


def layer_key(name: str) -> str:
    """The layer of parameter ``name``: the name up to its first all-digit part
    (``transformer.h.0`` for ``transformer.h.0.mlp.c_fc.weight``, ``0`` for a ``Sequential``'s
    ``0.bias``), else its module (``transformer.wte`` for ``transformer.wte.weight``), else the
    name itself (a parameter of the root module)."""
    parts = name.split(".")
    cut = next((i + 1 for i, part in enumerate(parts) if part.isdigit()), len(parts) - 1)
    return ".".join(parts[:cut]) or name


def layer_members(names: Iterable[str]) -> tuple[tuple[str, ...], ...]:
    """``names`` grouped by :func:`layer_key`, groups in order of first appearance and names
    in their given order within each."""
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(layer_key(name), []).append(name)
    return tuple(tuple(members) for members in groups.values())
