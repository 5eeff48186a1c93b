"""Joint patches whose parts would write one element with different values.

Where two parts of a joint spec write the same activation element, the hooks alone would let
the part registered last win, so ``a & b`` and ``b & a`` would disagree. The engines order the
writes instead (:func:`patchspec.execute.hooks.write_phase`): values from the other run
(``Clean``, ``Corrupted``) win over ablations (zero, mean, resample, noise) where they overlap,
which is causal tracing's "noise the subject, restore one clean state". Parts with the same
sources write the same values, and parts whose layers or indices cannot meet never collide.
What is left, two different ablations (or two interchanges) that may write one element, has no
order-free meaning and is refused before the first forward pass. The check is conservative:
it reasons on the selections each part may make over all its cells, not cell by cell.
"""

from __future__ import annotations

from patchspec.errors import SpecError
from patchspec.plan.cells import PerExample
from patchspec.plan.grid import Grid, Part

#: Unknown or every index of a dim.
_ANY = None


def _indices(part: Part, dim: str) -> frozenset[int] | None:
    """Every index of ``dim`` some cell of ``part`` may write, or ``None`` when it may be any."""
    for axis in part.axes:
        if axis.name == dim:
            if axis.kind != "index":
                return _ANY
            return frozenset(int(v) for v in axis.values)
    for name, selection in part.fixed:
        if name == dim:
            if selection is None or isinstance(selection, PerExample):
                return _ANY
            return frozenset(int(i) for i in selection)
    return _ANY


def _sources(part: Part, interchange: bool) -> frozenset[str]:
    return frozenset(s.label for s in part.spec.sources if s.interchange == interchange)


def _may_meet(a: Part, b: Part) -> bool:
    if not set(a.layers) & set(b.layers):
        return False
    if not (a.vectorised and b.vectorised):
        return True
    dims = [d for d in a.layout.dims if d not in ("batch", "layer")]
    for dim in dims:
        left, right = _indices(a, dim), _indices(b, dim)
        if left is not None and right is not None and not left & right:
            return False
    return True


def check_conflicts(grid: Grid) -> None:
    """Refuse a joint grid two of whose parts may write one element with values that neither
    precedes (two different ablations, or two different interchanges).

    Raises:
        SpecError: the message names both parts, their sources and the layers they share.
    """
    parts = grid.parts
    for i, a in enumerate(parts):
        for j in range(i + 1, len(parts)):
            b = parts[j]
            if a.spec.activation != b.spec.activation:
                continue
            clash = [
                _sources(a, kind) | _sources(b, kind)
                for kind in (False, True)
                if _sources(a, kind) and _sources(b, kind)
            ]
            sources = next((found for found in clash if len(found) > 1), None)
            if sources is None or not _may_meet(a, b):
                continue
            shared = sorted(set(a.layers) & set(b.layers))
            raise SpecError(
                f"parts {i} ({a.spec!r}) and {j} ({b.spec!r}) of a joint spec both write "
                f"{a.spec.activation!r} at layers {shared} with different sources "
                f"({', '.join(sorted(sources))}); where they overlap the result would depend on "
                "the order of the parts (only values from the other run take precedence over "
                "an ablation). Restrict them to disjoint layers, positions or heads, or give "
                "them the same source"
            )
