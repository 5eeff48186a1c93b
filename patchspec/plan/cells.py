"""Cells and regions: what one point of a sweep patches, spelt out explicitly.

A :class:`Region` is an activation at one layer plus a selection per activation dim (all,
a tuple of indices, or one tuple per prompt: :class:`PerExample`); every region is a product
of per-dim selections. A :class:`Cell` is one point of a sweep: its coordinates and its
regions. Compiled grids (:mod:`patchspec.plan.grid`) keep cells implicit; this module is the
explicit path, used for custom rules, explicit cell lists, and by the reference estimator,
which writes each cell's regions by plain indexing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, TypeAlias

import attrs

from patchspec.errors import SpecError, did_you_mean
from patchspec.layouts import POSITION_DIMS, layout
from patchspec.plan.positions import Aligned, Positions
from patchspec.plan.sizes import Sizes, size_origin
from patchspec.sources import Clean, Corrupted, Receiver, Source
from patchspec.spec import SOURCE_AXIS, PatchSpec, Slice, check_slice, plain_value


@attrs.frozen
class PerExample:
    """A dim's selection that differs by prompt: ``values[b]`` are the indices for prompt ``b``.

    Used for named positions (``"S2"``, ``"END"``) that sit at different token indices.
    """

    values: tuple[tuple[int, ...], ...]


#: One dim's selection inside a region: ``None`` (all), a tuple of indices, or one per prompt.
DimIndex: TypeAlias = tuple[int, ...] | PerExample | None


@attrs.frozen(eq=False)
class Region:
    """One patched region: an activation at one layer, selected per dim.

    Attributes:
        activation: Activation name.
        layer: Block index.
        index: ``(dim, selection)`` for each activation dim but ``batch``; ``None`` means all.
        source: Where the patched values come from.
    """

    activation: str
    layer: int
    index: tuple[tuple[str, DimIndex], ...]
    source: Source

    @property
    def hook_name(self) -> str:
        """The hook point holding this region's activation (its layout's hook at ``layer``)."""
        return layout(self.activation).hook_name(self.layer)


@attrs.frozen(eq=False)
class Cell:
    """One point of a sweep: its coordinates (one label per result dim) and what it patches."""

    coords: tuple[Any, ...]
    regions: tuple[Region, ...]


def normalise_int(spec_label: str, dim: str, value: int, size: int, what: str) -> int:
    """``value`` as an index into ``range(size)`` (negative ones count from the end).

    Numpy and torch integers count as ints; bools do not.

    Raises:
        SpecError: not an int, or outside ``-size..size-1``.
    """
    value = plain_value(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(
            f"{what} {dim}={value!r} in spec {spec_label!r} must be an int "
            f"(got {type(value).__name__})"
        )
    if not -size <= value < size:
        raise SpecError(
            f"{what} {dim}={value} in spec {spec_label!r} is outside the valid range "
            f"{-size}..{size - 1} ({dim} has {size} entries: {size_origin(dim)})"
        )
    return value % size


def is_named(selector: Any) -> bool:
    """Whether a selector names positions (a string or a list of strings)."""
    if isinstance(selector, str):
        return True
    return isinstance(selector, tuple | list) and bool(selector) and isinstance(selector[0], str)


def named_index(
    label: str,
    dim: str,
    selector: str | Sequence[str],
    positions: Positions | None,
    run: Receiver,
    what: str,
) -> DimIndex:
    """A named selection of a position dim, resolved in the ``run`` it indexes."""
    names = (selector,) if isinstance(selector, str) else tuple(selector)
    if dim not in POSITION_DIMS:
        raise SpecError(
            f"{what} {dim}={selector!r} in spec {label!r}: only position dims take names"
        )
    if positions is None:
        raise SpecError(
            f"{what} {dim}={selector!r} in spec {label!r} names a position, but the sweep got no "
            f"positions; pass positions={{{names[0]!r}: [one index per prompt]}} to run()"
        )
    table = positions.of(run)
    for name in names:
        if not isinstance(name, str):
            raise SpecError(f"{what} {dim}={selector!r} in spec {label!r} mixes names and ints")
        if name not in table:
            raise SpecError(
                f"{what} {dim}={name!r} in spec {label!r} is not a named position; the named "
                f"positions are {', '.join(positions.names)}{did_you_mean(name, positions.names)}"
            )
    batch = len(table[names[0]])
    per_prompt = tuple(tuple(dict.fromkeys(table[n][b] for n in names)) for b in range(batch))
    if all(p == per_prompt[0] for p in per_prompt):
        return per_prompt[0]
    return PerExample(per_prompt)



def axis_values(
    spec: PatchSpec, axis: str, sizes: Sizes, positions: Positions | None = None
) -> tuple[Any, ...]:
    """The coordinates a spec sweeps along ``axis`` (sources for the ``source`` axis).

    Raises:
        SpecError: a restriction outside its dim, or an unknown named position.
    """
    selector = spec.restriction(axis)
    dims = spec.layout.patch_dims
    if axis == SOURCE_AXIS or axis == spec.parameter_axis:
        return spec.sources
    if axis not in dims:  # a custom-rule axis: its values are listed explicitly
        if selector is None or isinstance(selector, Slice):
            raise SpecError(f"custom-rule axis {axis!r} of spec {spec.label!r} lists no values")
        return selector if isinstance(selector, tuple) else (selector,)
    if axis in POSITION_DIMS and positions is not None and selector is None:
        return positions.names
    if is_named(selector):
        names = (selector,) if isinstance(selector, str) else tuple(selector)  # type: ignore[arg-type]
        named_index(spec.label, axis, names, positions, spec.receiver, "restriction")
        return names
    size = sizes.size(axis)
    if selector is None:
        return tuple(range(size))
    return resolve(spec.label, axis, selector, size, "restriction")


def resolve(
    label: str, dim: str, selector: Any, size: int, what: str, *, aliases: bool = False
) -> tuple[int, ...]:
    """The indices into ``range(size)`` a selector picks: an int, a list of ints or a slice.

    Args:
        label: The spec's label, for errors.
        dim: The dim, for errors.
        selector: The selector (numpy and torch integers and arrays count as ints).
        size: The dim's size.
        what: What the selector is, for errors (``"restriction"``).
        aliases: Merge entries that name the same index (``1`` and ``-1`` of a dim of 2) into
            one, as a region selection may; by default they are refused, since a swept axis
            would get the same coordinate twice and a restriction would name an index twice.

    Raises:
        SpecError: not ints, outside the dim, selecting nothing, or (unless ``aliases``)
            two entries naming the same index.

    Example:
        >>> resolve("s", "layer", [0, -1], 3, "restriction")
        (0, 2)
    """
    selector = plain_value(selector)
    if isinstance(selector, slice):
        selector = check_slice(f"{what} {dim}={selector!r} in spec {label!r}", selector)
    if isinstance(selector, Slice):
        values = selector.indices(size)
        if not values:
            raise SpecError(
                f"{what} {dim}={selector!r} in spec {label!r} selects nothing "
                f"({dim} has {size} entries)"
            )
        return values
    if isinstance(selector, int) and not isinstance(selector, bool):
        return (normalise_int(label, dim, selector, size, what),)
    if isinstance(selector, range | list | tuple):
        given = tuple(plain_value(v) for v in selector)
        values = tuple(normalise_int(label, dim, v, size, what) for v in given)
        if not values:
            raise SpecError(f"{what} {dim}={selector!r} in spec {label!r} selects nothing")
        if len(set(values)) != len(values):
            if aliases:
                return tuple(dict.fromkeys(values))
            index = next(v for i, v in enumerate(values) if v in values[:i])
            named = [g for g, v in zip(given, values, strict=True) if v == index]
            raise SpecError(
                f"{what} {dim}={selector!r} in spec {label!r} names {dim} {index} more than "
                f"once: {' and '.join(map(str, named))} are the same index ({dim} has {size} "
                f"entries: {size_origin(dim)}); give each index once"
            )
        return values
    raise SpecError(
        f"{what} {dim}={selector!r} in spec {label!r} must be an int, a list of ints or a slice"
    )


def regions_of(
    spec: PatchSpec,
    cell: Mapping[str, Any],
    sizes: Sizes,
    positions: Positions | None = None,
) -> tuple[Region, ...]:
    """The regions one cell of ``spec`` patches.

    Args:
        spec: The spec.
        cell: The cell's coordinates by axis (a swept ``source`` axis, or an axis sweeping a
            field of the source, holds the source itself).
        sizes: Sizes of the model and inputs.
        positions: Resolved named positions, when the sweep got any.

    Raises:
        SpecError: a custom rule returned an unknown dim or an index that does not fit, or a
            named position is unknown.
    """
    lay = spec.layout
    chooser = SOURCE_AXIS if SOURCE_AXIS in spec.axes else spec.parameter_axis
    source = spec.source if chooser is None else cell[chooser]
    if spec.rule is None:
        index: dict[str, Any] = {axis: cell[axis] for axis in spec.axes if axis != chooser}
        what = "restriction"
    else:
        try:
            out = spec.rule(dict(cell))
        except Exception as err:  # the user's code: say which spec and cell, keep the cause
            raise SpecError(
                f"rule of spec {spec.label!r} raised {type(err).__name__}: {err} for cell "
                f"{dict(cell)}"
            ) from err
        if not isinstance(out, Mapping):
            raise SpecError(
                f"rule of spec {spec.label!r} must return a mapping of dim -> index, "
                f"got {type(out).__name__} for cell {dict(cell)}"
            )
        for key in out:
            if key not in lay.patch_dims:
                raise SpecError(
                    f"rule of spec {spec.label!r} returned dim {key!r} for cell {dict(cell)}; "
                    f"valid dims of {spec.activation!r} are {', '.join(lay.patch_dims)}"
                )
        index = dict(out)
        what = f"rule output for cell {dict(cell)}:"
    from_rule = set(index) if spec.rule is not None else set()
    for key, selector in spec.restrictions:
        if key in lay.patch_dims and key not in spec.axes and key not in index:
            index[key] = selector

    def how(dim: str) -> tuple[str, bool]:
        """What a selection of ``dim`` is, for errors, and whether aliases merge: a rule's
        output is a region (one index named twice is patched once); a restriction is not."""
        return (what, True) if dim in from_rule else ("restriction", False)

    layers = (
        resolve(
            spec.label,
            "layer",
            index.pop("layer"),
            sizes.n_layers,
            how("layer")[0],
            aliases=how("layer")[1],
        )
        if "layer" in index
        else tuple(range(sizes.n_layers))
    )
    named = False
    per_dim: list[tuple[str, DimIndex]] = []
    for dim in lay.dims[1:]:
        if dim not in index:
            per_dim.append((dim, None))
        elif is_named(index[dim]):
            named = True
            per_dim.append(
                (dim, named_index(spec.label, dim, index[dim], positions, spec.receiver, how(dim)[0]))
            )
        else:
            label, merge = how(dim)
            per_dim.append(
                (dim, resolve(spec.label, dim, index[dim], sizes.size(dim), label, aliases=merge))
            )
    if named:
        source = aligned(spec.activation, source, positions)
    return tuple(Region(spec.activation, layer, tuple(per_dim), source) for layer in layers)


def aligned(activation: str, source: Source, positions: Positions | None) -> Source:
    """``source`` read at each named position's donor index, where clean and corrupted differ.

    Only the clean and corrupted runs are donors whose named positions can move: ``Clean``,
    ``Corrupted`` and sources with a ``donor`` run (``Subspace`` without a fixed
    ``source_pos``, ``SAELatent``) are aligned; any other source (and a sweep whose names sit at
    the same index in both runs) is returned as it is.
    """
    if positions is None:
        return source
    donor: Receiver
    if isinstance(source, Clean | Corrupted):
        donor = "clean" if isinstance(source, Clean) else "corrupted"
    elif (
        source.interchange
        and getattr(source, "donor", None) in ("clean", "corrupted")
        and getattr(source, "source_pos", None) is None
    ):  # a donor-run source of the other run (Subspace, SAELatent) reads the donor's index too
        donor = source.donor  # type: ignore[attr-defined]
    else:
        return source
    moves = positions.moves(donor, source.receiver)
    if not any(moves):
        return source
    return Aligned(source, layout(activation).position_dims, moves)
