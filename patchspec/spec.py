"""PatchSpec: what to patch, as an immutable value.

A spec pairs an activation (see :mod:`patchspec.layouts`) with the named axes to sweep, optional
restrictions of any axis or dim, a slicing rule and a value source. It holds no model and no
tensors: it is hashable, comparable, printable and round-trips through a plain dict. Specs
combine with ``&`` into a :class:`JointSpec` that patches several regions in one forward pass.

This module imports neither torch nor TransformerLens.
"""

from __future__ import annotations

import itertools
import numbers
import os
import re
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeAlias

import attrs

from patchspec.errors import SpecError, did_you_mean
from patchspec.layouts import DIM_SIZES, POSITION_DIMS, Layout, layout
from patchspec.options import checked_keywords
from patchspec.sources import Clean, Receiver, Source, source_from_dict

if TYPE_CHECKING:
    import xarray as xr

    from patchspec.execute.protocols import Estimator, Executor
    from patchspec.plan.positions import PositionTable

#: The axis that sweeps value sources (``restrictions={"source": (Corrupted(), Zero())}``).
SOURCE_AXIS = "source"
#: Prompts: a string, a list of strings, or an integer tensor ``[batch, pos]``.
Prompts: TypeAlias = Any
#: A metric, or a list or mapping of metrics (see :func:`patchspec.metrics.as_metrics`).
MetricArg: TypeAlias = Any


#: Dims the runner adds to results: ``example`` (a per-prompt metric) and ``metric`` (several
#: metrics evaluated together). No axis may use them.
RESERVED_DIMS: tuple[str, ...] = ("example", "metric")
#: Non-dim coordinates results carry (baselines, prompt texts); no axis may use them either, nor
#: a name ending in ``_token`` (each position dim gets a ``<dim>_token`` coordinate).
RESERVED_COORDS: tuple[str, ...] = (
    "clean_baseline",
    "corrupted_baseline",
    "clean_prompt",
    "corrupted_prompt",
)
#: Names a custom-rule axis may not take: every built-in dim of any activation (and ``layer``),
#: alone or numbered as a joint spec numbers shared axes (``pos_2``).
BUILTIN_DIMS: tuple[str, ...] = tuple(DIM_SIZES)


def plain_value(value: Any) -> Any:
    """A numpy or torch scalar (or array) as the Python value (or nested list) it holds.

    Python ints, strings and other values come back unchanged; any other integer type
    (``numbers.Integral``) becomes an ``int``. Bools stay bools, so they can be refused.

    Example:
        >>> import numpy as np
        >>> plain_value(np.int64(3)), plain_value(np.array([1, 2])), plain_value(np.bool_(True))
        (3, [1, 2], True)
    """
    if isinstance(value, str | bytes | bool | int | float | slice):
        return value
    if hasattr(value, "tolist") and hasattr(value, "dtype"):  # numpy, torch, pandas
        return value.tolist()
    if isinstance(value, numbers.Integral):
        return int(value)
    return value


def check_slice(where: str, value: slice | Slice) -> Slice:
    """``value`` as a :class:`Slice` with int (or ``None``) bounds and a non-zero step.

    Numpy and torch integer bounds become ints.

    Args:
        where: What the slice is, for the error (``"restriction layer=slice(0, 2, 0)"``).
        value: The slice.

    Raises:
        SpecError: a bound or step is not an int or ``None`` (bools and floats included), or
            the step is 0.

    Example:
        >>> check_slice("restriction layer", slice(1, None))
        slice(1, None, None)
    """
    bounds = []
    for field, bound in zip(("start", "stop", "step"), (value.start, value.stop, value.step), strict=True):
        bound = plain_value(bound)
        if bound is not None and (isinstance(bound, bool) or not isinstance(bound, int)):
            raise SpecError(
                f"{where}: slice {field} {bound!r} must be an int or None "
                f"(got {type(bound).__name__})"
            )
        bounds.append(bound)
    if bounds[2] == 0:
        raise SpecError(f"{where}: slice step cannot be 0; give a non-zero int or None")
    return Slice(*bounds)


@attrs.frozen
class Slice:
    """A hashable ``slice`` (Python 3.11 slices are not hashable) of int bounds.

    Raises:
        SpecError: a bound that is not an int or ``None``, or a step of 0.
    """

    start: int | None = None
    stop: int | None = None
    step: int | None = None

    def __attrs_post_init__(self) -> None:
        for field, bound in (("start", self.start), ("stop", self.stop), ("step", self.step)):
            if bound is not None and (isinstance(bound, bool) or not isinstance(bound, int)):
                raise SpecError(f"{self!r}: slice {field} {bound!r} must be an int or None")
        if self.step == 0:
            raise SpecError(f"{self!r}: slice step cannot be 0; give a non-zero int or None")

    def indices(self, size: int) -> tuple[int, ...]:
        """The indices this slice selects from ``range(size)``."""
        return tuple(range(*slice(self.start, self.stop, self.step).indices(size)))

    def __repr__(self) -> str:
        parts = ["" if v is None else str(v) for v in (self.start, self.stop, self.step)]
        return f"slice({', '.join(p or 'None' for p in parts)})"


#: A stored restriction: one value, a tuple of values, or a slice of positions.
Selector: TypeAlias = Hashable | tuple[Hashable, ...] | Slice

#: A custom slicing rule: a cell's labelled coordinates -> an index per activation dim
#: (plus optionally ``layer``); dims it leaves out are patched whole.
Rule: TypeAlias = Callable[[Mapping[str, Any]], Mapping[str, Any]]


def _selector(name: str, value: Any) -> Selector:
    """Normalise one user-given restriction to a hashable :data:`Selector`.

    Numpy and torch integer scalars and arrays become Python ints and tuples of them, so a
    spec restricted with ``np.int64(1)`` equals (and hashes like) one restricted with ``1``.
    """
    given = value
    value = plain_value(value)
    if isinstance(value, slice | Slice):
        return check_slice(f"restriction {name}={given!r}", value)
    if value is None:
        raise SpecError(
            f"restriction {name}=None: give an int, a list or a slice (leave {name!r} out of the "
            "restrictions to keep all of it)"
        )
    if isinstance(value, bool):
        raise SpecError(f"restriction {name}={given!r} is a bool; give an int, a list or a slice")
    if isinstance(value, Mapping | set | frozenset):
        raise SpecError(
            f"restriction {name}={given!r} is a {type(value).__name__}; give an int, a list "
            "(in the order the result should have) or a slice"
        )
    if isinstance(value, str | bytes | int) or not isinstance(value, Iterable):
        if not isinstance(value, Hashable):
            raise SpecError(f"restriction {name}={given!r} is not hashable")
        return value
    values = tuple(plain_value(v) for v in value)
    if not values:
        raise SpecError(f"restriction {name}={given!r} selects nothing; give at least one value")
    for item in values:
        if isinstance(item, slice | Slice):
            raise SpecError(
                f"restriction {name}={given!r} holds a slice inside a list; give either a list "
                "of values or one slice"
            )
        if not isinstance(item, Hashable):
            raise SpecError(
                f"restriction {name}={given!r} holds {item!r}, a {type(item).__name__}; "
                "give a flat list of values (no nested lists)"
            )
    repeated = [v for i, v in enumerate(values) if v in values[:i]]
    if repeated:
        raise SpecError(
            f"restriction {name}={given!r} repeats a value ({repeated[0]!r}); give each value once"
        )
    return values


def _restrictions(value: Mapping[str, Any] | Iterable[tuple[str, Any]] | None) -> tuple:
    """Convert user restrictions to a sorted tuple of ``(name, Selector)`` pairs."""
    if value is None:
        return ()
    if isinstance(value, Mapping):
        items = list(value.items())
    elif isinstance(value, Iterable) and not isinstance(value, str | bytes):
        items = list(value)
        for item in items:
            if not isinstance(item, tuple | list) or len(item) != 2:
                raise SpecError(
                    f"restrictions must be a dict {{name: values}} (or (name, values) pairs), "
                    f"got the entry {item!r}"
                )
    else:
        raise SpecError(
            f"restrictions must be a dict {{name: values}}, got {type(value).__name__}: {value!r}"
        )
    for key, _ in items:
        if not isinstance(key, str):
            raise SpecError(
                f"restriction names must be strings naming an axis or dim, got {key!r} "
                f"({type(key).__name__})"
            )
    names = [k for k, _ in items]
    repeated = sorted({k for k in names if names.count(k) > 1})
    if repeated:
        raise SpecError(f"restriction {repeated[0]!r} is given twice")
    return tuple(sorted((k, _selector(k, v)) for k, v in items))


def _axes(value: str | Iterable[str]) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if value is None or isinstance(value, Mapping | set | frozenset | bytes) or not isinstance(
        value, Iterable
    ):
        raise SpecError(
            f"axes must be a dim name or a sequence of them (e.g. ('layer', 'pos')), "
            f"got {type(value).__name__}: {value!r}"
        )
    return tuple(plain_value(a) for a in value)


def _explicit(selector: Selector) -> bool:
    """Whether a selector lists its values without needing a size (not a slice)."""
    return not isinstance(selector, Slice)


def check_name(owner: str, name: Any) -> None:
    """Refuse a ``name=`` that is not ``None`` or a non-empty string.

    Raises:
        SpecError: naming ``owner`` (``"PatchSpec"``) and the value.
    """
    if name is not None and (not isinstance(name, str) or not name):
        raise SpecError(
            f"{owner} name must be a non-empty string or None, got {type(name).__name__}: {name!r}"
        )


def check_dim_name(axis: str, what: str) -> None:
    """Refuse a result dim name the runner or the labels already use.

    Raises:
        SpecError: ``axis`` is ``example``/``metric`` (added by the runner), a coordinate name
            (``clean_baseline``, ...), or ends in ``_token``.
    """
    if axis in RESERVED_DIMS:
        raise SpecError(
            f"{what} {axis!r} is reserved: the runner adds an {axis!r} dim to results "
            f"({'one value per prompt' if axis == 'example' else 'one value per metric'}); "
            "choose another name"
        )
    if axis in RESERVED_COORDS or axis.endswith("_token"):
        raise SpecError(
            f"{what} {axis!r} is reserved for a coordinate of results (the baselines, the "
            "prompts and <dim>_token labels); choose another name"
        )


def _custom_axis_clash(axis: str) -> str | None:
    """The built-in dim a custom axis name would pass for (``pos``, ``pos_2`` -> ``pos``)."""
    base = re.sub(r"_\d+$", "", axis)
    return base if base in BUILTIN_DIMS or base == SOURCE_AXIS else None


class _Combinable:
    """What both kinds of spec do: combine with ``&`` and run."""

    @property
    def parts(self) -> tuple[PatchSpec, ...]:
        raise NotImplementedError

    def __and__(self, other: PatchSpec | JointSpec) -> JointSpec:
        if not isinstance(other, PatchSpec | JointSpec):
            raise SpecError(
                f"& joins a spec with a PatchSpec or JointSpec, got {type(other).__name__}: "
                f"{other!r}"
            )
        return JointSpec(parts=self.parts + other.parts)

    @checked_keywords
    def run(
        self,
        model: Any,
        clean: Prompts,
        corrupted: Prompts,
        metric: MetricArg,
        *,
        engine: str | Estimator | None = None,
        progress: bool | None = None,
        positions: PositionTable | tuple[PositionTable, PositionTable] | None = None,
        reference: Prompts | Mapping[str, Prompts] | None = None,
        tensors: Mapping[str, Any] | None = None,
        executor: str | Executor | None = None,
        cells_per_batch: int | None = None,
        max_memory: str | int | float | None = None,
        start_at_layer: bool = True,
        hash_weights: bool = False,
        estimator: str | Estimator | None = None,
        ig_steps: int | None = None,
        store: str | os.PathLike[str] | None = None,
    ) -> xr.DataArray:
        """Sweep this spec and return a labelled ``xarray.DataArray``.

        See :meth:`patchspec.Sweep.run` for the arguments; this is ``Sweep(self).run(...)``
        for one spec, returning its DataArray instead of a Dataset.
        """
        from patchspec import runner
        from patchspec.options import RunOptions

        options = RunOptions(
            engine=engine,
            executor=executor,
            progress=progress,
            cells_per_batch=cells_per_batch,
            max_memory=max_memory,
            start_at_layer=start_at_layer,
            hash_weights=hash_weights,
            estimator=estimator,
            ig_steps=ig_steps,
            store=store,
        )
        (array,) = runner.run_specs(
            (self,),  # type: ignore[arg-type]
            model,
            clean,
            corrupted,
            metric,
            options=options,
            positions=positions,
            reference=reference,
            tensors=tensors,
        )
        return array


@attrs.frozen(repr=False)
class PatchSpec(_Combinable):
    """What to patch: an activation, the axes to sweep and how a cell maps to a region.

    Args:
        activation: Activation name, a key of :data:`patchspec.layouts.LAYOUTS`.
        axes: Axes to sweep, in result dim order. Each is ``layer`` or a dim of the activation
            (or, with a custom ``rule``, any name whose values are given in ``restrictions``).
        restrictions: Values to keep per axis or dim: an int, a list, or a slice; negative
            positions count from the end. A restriction of a dim that is not swept narrows the
            patched region instead (e.g. ``pos=-1``: patch only the last position). Numpy and
            torch integers (scalars and arrays) count as ints; bools, floats and ``None`` do
            not. Each index may be named once: ``[1, 1]`` is refused here, and entries that
            name the same index once the model's sizes are known (``layer=[1, -1]`` on a
            2-layer model) are refused when the sweep compiles, before any forward pass, since
            a result would otherwise carry the same coordinate twice.
        rule: Optional callable from a cell's coordinates (``{"layer": 3, "head": 1}``) to an
            index per activation dim; dims it leaves out are patched whole. By default each swept
            axis indexes the activation dim of the same name.
        source: Where patched values come from (default: the clean run, i.e. denoising).
        name: A label for results; derived from the activation and axes when omitted.

    Axis names are result dims. ``example`` and ``metric`` are reserved (the runner adds
    them), and so are the names of results' other coordinates (``clean_baseline``, ...,
    ``<dim>_token``); a custom-rule axis may not take a built-in dim's name (``head``), plain
    or numbered as joint specs number shared axes (``pos_2``).

    Raises:
        SpecError: an unknown activation, an unknown, duplicate or reserved axis, or a bad
            restriction.

    Example:
        >>> spec = PatchSpec("z", axes=("layer", "pos", "head"))
        >>> spec.sel(layer=[0, 1], pos=-1)
        PatchSpec('z', axes=('layer', 'pos', 'head'), restrictions={'layer': (0, 1), 'pos': -1})
    """

    activation: str
    axes: tuple[str, ...] = attrs.field(kw_only=True, converter=_axes)
    restrictions: tuple[tuple[str, Selector], ...] = attrs.field(
        kw_only=True, default=(), converter=_restrictions
    )
    rule: Rule | None = attrs.field(kw_only=True, default=None)
    source: Source = attrs.field(kw_only=True, factory=Clean)
    name: str | None = attrs.field(kw_only=True, default=None)

    def __attrs_post_init__(self) -> None:
        lay = layout(self.activation)
        check_name("PatchSpec", self.name)
        restricted = dict(self.restrictions)
        seen: set[str] = set()
        for axis in self.axes:
            if not isinstance(axis, str) or not axis:
                raise SpecError(f"axis {axis!r} must be a non-empty string naming a dim")
            check_dim_name(axis, "axis")
            if axis in seen:
                raise SpecError(f"axis {axis!r} is listed twice in axes={self.axes!r}")
            seen.add(axis)
            if axis == "batch":
                raise SpecError(
                    "axis 'batch' cannot be swept: every cell patches all examples; "
                    "per-example values come from a metric that returns one value per prompt"
                )
            if axis == SOURCE_AXIS:
                _check_sources(restricted.get(axis))
                continue
            if axis in getattr(self.source, "sweepable", ()) and axis not in lay.patch_dims:
                _check_parameter_axis(self, axis, restricted.get(axis))
                continue
            if axis in lay.patch_dims:
                continue
            if self.rule is not None and axis in restricted and _explicit(restricted[axis]):
                builtin = _custom_axis_clash(axis)
                if builtin is not None:
                    how = (
                        "reuses the name of the built-in dim"
                        if axis == builtin
                        else "looks like a joint spec's numbered copy of the built-in dim"
                    )
                    raise SpecError(
                        f"custom-rule axis {axis!r} of a spec on {self.activation!r} {how} "
                        f"{builtin!r}, so its labels would be mistaken for {builtin!r}'s; give "
                        f"the custom axis a name of its own, e.g. {builtin + '_group'!r}"
                    )
                continue
            hint = did_you_mean(axis, lay.patch_dims)
            if axis == "head" and "kv_head" in lay.dims:
                hint = "; keys and values have one head per key/value group: did you mean 'kv_head'?"
            extra = (
                ""
                if self.rule is None
                else " (a custom-rule axis needs its values listed in restrictions)"
            )
            raise SpecError(
                f"axis {axis!r} is not a dim of activation {self.activation!r} "
                f"({', '.join(lay.dims)}){extra}{hint}"
            )
        for key, selector in self.restrictions:
            if key not in lay.patch_dims and key not in self.axes:
                hint = did_you_mean(key, lay.patch_dims)
                if key == "head" and "kv_head" in lay.dims:
                    hint = (
                        "; keys and values have one head per key/value group: "
                        "did you mean 'kv_head'?"
                    )
                raise SpecError(
                    f"restriction {key!r} is neither an axis nor a dim of activation "
                    f"{self.activation!r} (valid: {', '.join(lay.patch_dims)}){hint}"
                )
            if key in lay.patch_dims:
                _check_int_selector(key, selector)
        if not isinstance(self.source, Source):
            raise SpecError(
                f"source must be a patchspec.sources.Source, got {type(self.source).__name__}"
            )
        if self.rule is not None and not callable(self.rule):
            raise SpecError(f"rule must be callable, got {type(self.rule).__name__}")
        swept = [a for a in self.axes if a == SOURCE_AXIS or a in self.source.sweepable]
        if len(swept) > 1:
            raise SpecError(
                f"spec on {self.activation!r} sweeps {swept[0]!r} and {swept[1]!r}, which both "
                "choose the value source; sweep one of them (list several sources instead)"
            )
        receivers = {source.receiver for source in self.sources}
        if len(receivers) > 1:
            raise SpecError(
                f"all sources swept by one spec must patch the same run; got {list(self.sources)} "
                f"patching {sorted(receivers)} (e.g. Clean() patches the corrupted run, Zero() "
                "the clean run: use Zero(receiver='corrupted') to compare them)"
            )

    # --- views -------------------------------------------------------------------------
    @property
    def layout(self) -> Layout:
        """The activation's :class:`~patchspec.layouts.Layout`."""
        return layout(self.activation)

    @property
    def dims(self) -> tuple[str, ...]:
        """Dims of the result of sweeping this spec (the axes, in order)."""
        return self.axes

    @property
    def label(self) -> str:
        """The spec's name, or one derived from activation and axes."""
        return self.name or f"{self.activation}_by_{'_'.join(self.axes) or 'nothing'}"

    @property
    def parts(self) -> tuple[PatchSpec, ...]:
        """The specs patched together in one cell (just this one)."""
        return (self,)

    def restriction(self, name: str) -> Selector | None:
        """The restriction of ``name``, or ``None``."""
        return dict(self.restrictions).get(name)

    @property
    def sources(self) -> tuple[Source, ...]:
        """The value sources this spec patches from: the swept ones, or just ``source``."""
        if SOURCE_AXIS in self.axes:
            listed = self.restriction(SOURCE_AXIS)
            return listed if isinstance(listed, tuple) else (listed,)  # type: ignore[return-value]
        axis = self.parameter_axis
        if axis is not None:
            return _with_parameter(self.source, axis, self.restriction(axis))
        return (self.source,)

    @property
    def parameter_axis(self) -> str | None:
        """The swept axis that sets a field of the source (``strength`` of a
        :class:`~patchspec.interventions.Subspace`), or ``None``.

        Example:
            >>> from patchspec.interventions import Add
            >>> spec = PatchSpec("resid_pre", axes=("coef", "pos"), restrictions={"coef": [0, 1]},
            ...                  source=Add("steer"))
            >>> spec.parameter_axis, [s.coef for s in spec.sources]
            ('coef', [0, 1])
        """
        sweepable = self.source.sweepable
        lay = self.layout
        return next((a for a in self.axes if a in sweepable and a not in lay.patch_dims), None)

    @property
    def receiver(self) -> Receiver:
        """The run every source of this spec patches (``"corrupted"`` for denoising)."""
        return self.sources[0].receiver

    # --- derived specs -----------------------------------------------------------------
    def sel(self, **restrictions: Any) -> PatchSpec:
        """A new spec with these restrictions added (replacing earlier ones of the same name).

        Example:
            >>> PatchSpec("resid_pre", axes=("layer", "pos")).sel(layer=slice(8, 12))
            PatchSpec('resid_pre', axes=('layer', 'pos'), restrictions={'layer': slice(8, 12, None)})
        """
        merged = {**dict(self.restrictions), **restrictions}
        return attrs.evolve(self, restrictions=merged)

    def over(self, *axes: str) -> PatchSpec:
        """A new spec sweeping ``axes`` instead."""
        return attrs.evolve(self, axes=axes)

    def named(self, name: str) -> PatchSpec:
        """A new spec with this result name."""
        return attrs.evolve(self, name=name)

    def using(self, source: Source) -> PatchSpec:
        """A new spec taking patched values from ``source``."""
        return attrs.evolve(self, source=source)

    def over_sources(self, *sources: Source) -> PatchSpec:
        """A new spec sweeping ``sources`` as a leading ``source`` axis.

        The result gets a ``source`` dim labelled by each source's :attr:`~Source.label`
        (``"zero"``, ``"gaussian(scale=0.1)"``). All sources must patch the same run.

        Example:
            >>> from patchspec.sources import Corrupted, Zero
            >>> PatchSpec("z", axes=("layer", "head")).over_sources(Corrupted(), Zero()).dims
            ('source', 'layer', 'head')
        """
        axes = self.axes if SOURCE_AXIS in self.axes else (SOURCE_AXIS, *self.axes)
        return attrs.evolve(
            self, axes=axes, restrictions={**dict(self.restrictions), SOURCE_AXIS: sources}
        )


    # --- serialisation -----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A plain dict (JSON-friendly) that :meth:`from_dict` turns back into this spec.

        Raises:
            SpecError: the spec has a custom rule, which is code and cannot be serialised.
        """
        if self.rule is not None:
            raise SpecError(
                f"spec {self.label!r} has a custom rule {self.rule!r}; only specs with the "
                "built-in rule can be written to a dict"
            )
        out: dict[str, Any] = {"activation": self.activation, "axes": list(self.axes)}
        if self.restrictions:
            out["restrictions"] = {k: _selector_to_plain(v) for k, v in self.restrictions}
        if not isinstance(self.source, Clean):
            out["source"] = self.source.to_dict()
        if self.name is not None:
            out["name"] = self.name
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PatchSpec:
        """Build a spec from :meth:`to_dict` output (or a hand-written dict of the same shape).

        Raises:
            SpecError: unknown keys, or any error the constructor raises.
        """
        _fields(
            data,
            "a spec dict",
            known=("activation", "axes", "restrictions", "source", "name"),
            required=("activation", "axes"),
        )
        axes = data["axes"]
        if not isinstance(axes, str | list | tuple):
            raise SpecError(
                f"a spec dict's 'axes' must be a list of dim names, got "
                f"{type(axes).__name__}: {axes!r}"
            )
        plain = data.get("restrictions")
        if plain is None:
            plain = {}
        if not isinstance(plain, Mapping):
            raise SpecError(
                f"a spec dict's 'restrictions' must be a dict {{name: values}}, got "
                f"{type(plain).__name__}: {plain!r}"
            )
        restrictions = {k: _selector_from_plain(k, v) for k, v in plain.items()}
        source = data.get("source")
        return cls(
            data["activation"],
            axes=axes,
            restrictions=restrictions,
            source=Clean() if source is None else _source_from_plain("'source'", source),
            name=data.get("name"),
        )

    def __repr__(self) -> str:
        args = [repr(self.activation), f"axes={self.axes!r}"]
        if self.restrictions:
            args.append(f"restrictions={dict(self.restrictions)!r}")
        if self.rule is not None:
            args.append(f"rule={getattr(self.rule, '__qualname__', self.rule)!s}")
        if not isinstance(self.source, Clean):
            args.append(f"source={self.source!r}")
        if self.name is not None:
            args.append(f"name={self.name!r}")
        return f"PatchSpec({', '.join(args)})"


def _check_int_selector(name: str, selector: Selector) -> None:
    values = selector if isinstance(selector, tuple) else (selector,)
    named = name in POSITION_DIMS
    for value in values:
        if isinstance(value, Slice) or (named and isinstance(value, str)):
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            what = "an int or a position name, a list of them" if named else "an int, a list of ints"
            raise SpecError(f"restriction {name}={value!r} must be {what} or a slice")
    if named and len({isinstance(v, str) for v in values}) > 1:
        raise SpecError(
            f"restriction {name}={selector!r} mixes position names and ints; give names only "
            "(resolved per prompt) or ints only"
        )


def _with_parameter(source: Source, axis: str, selector: Selector | None) -> tuple[Source, ...]:
    """``source`` with its field ``axis`` set to each listed value (validated again)."""
    values = selector if isinstance(selector, tuple) else (selector,)
    return tuple(attrs.evolve(source, **{axis: value}) for value in values)  # type: ignore[misc]


def _check_parameter_axis(spec: PatchSpec, axis: str, selector: Selector | None) -> None:
    if selector is None or isinstance(selector, Slice):
        raise SpecError(
            f"axis {axis!r} sweeps the {axis!r} field of {spec.source.label} and needs its values "
            f"listed, e.g. restrictions={{{axis!r}: [0.0, 0.5, 1.0]}}; got {selector!r}"
        )
    _with_parameter(spec.source, axis, selector)  # each value passes the source's validators


def _check_sources(selector: Selector | None) -> None:
    values = selector if isinstance(selector, tuple) else (selector,)
    if selector is None or not all(isinstance(v, Source) for v in values):
        raise SpecError(
            f"axis 'source' sweeps value sources and needs them listed, e.g. "
            f"restrictions={{'source': (Corrupted(), Zero())}} or "
            f"spec.over_sources(Corrupted(), Zero()); "
            f"got {selector!r}"
        )


def _selector_to_plain(selector: Selector) -> Any:
    if isinstance(selector, Slice):
        return {"slice": [selector.start, selector.stop, selector.step]}
    if isinstance(selector, Source):
        return selector.to_dict()
    if isinstance(selector, tuple):
        return [_selector_to_plain(v) for v in selector]
    return selector


def _fields(
    data: Any,
    what: str,
    *,
    known: Sequence[str],
    required: Sequence[str],
    elsewhere: Mapping[str, str] | None = None,
) -> None:
    """Check the keys of a dict form: a mapping, string keys, none unknown, none missing.

    ``elsewhere`` maps a key that belongs to another kind of dict to the function that reads it.
    """
    if not isinstance(data, Mapping):
        raise SpecError(f"{what} must be a dict, got {type(data).__name__}: {data!r}")
    for key in data:
        if not isinstance(key, str):
            raise SpecError(f"{what} has a key {key!r} that is not a string; valid keys are {', '.join(known)}")
    hints = {
        "joint": "spec_from_dict",
        "sweep": "Sweep.from_dict",
        "activation": "PatchSpec.from_dict",
        **(elsewhere or {}),
    }
    for key in data:
        if key not in known:
            where = f" (a dict with {key!r} is read by {hints[key]})" if key in hints else ""
            raise SpecError(
                f"unknown {what.removeprefix('a ').removesuffix(' dict')} key {key!r}; valid "
                f"keys are {', '.join(known)}{where}{did_you_mean(key, known)}"
            )
    missing = [key for key in required if key not in data]
    if missing:
        raise SpecError(
            f"{what} needs {' and '.join(repr(k) for k in missing)}, got keys {sorted(data)}"
        )


def _source_from_plain(where: str, value: Any) -> Source:
    """A source from its dict form; any failure is a :class:`SpecError` naming ``where``."""
    if not isinstance(value, Mapping) or not isinstance(value.get("kind"), str):
        raise SpecError(
            f"{where} must be a source dict with a string 'kind' (e.g. {{'kind': 'zero'}}), "
            f"got {value!r}"
        )
    try:
        return source_from_dict(value)
    except SpecError:
        raise
    except (TypeError, ValueError) as err:
        raise SpecError(f"{where}: bad source dict {dict(value)!r}: {err}") from None


def _selector_from_plain(name: str, value: Any) -> Any:
    """A restriction from its plain form: values, lists, ``{"slice": [...]}`` or source dicts."""
    if isinstance(value, list | tuple):
        return [_selector_from_plain(name, v) for v in value]
    if isinstance(value, Mapping) and "kind" in value:
        return _source_from_plain(f"restriction {name!r}", value)
    if isinstance(value, Mapping):
        bounds = value.get("slice")
        if set(value) != {"slice"} or not isinstance(bounds, list | tuple) or not 1 <= len(bounds) <= 3:
            raise SpecError(
                f"restriction {name!r} in a spec dict: a dict there must be "
                f"{{'slice': [start, stop, step]}} or a source dict with a 'kind', got {value!r}"
            )
        return check_slice(f"restriction {name}={value!r}", slice(*bounds))
    return value


def _joint_parts(value: Iterable[PatchSpec | JointSpec]) -> tuple[PatchSpec, ...]:
    if isinstance(value, PatchSpec | JointSpec) or not isinstance(value, Iterable):
        raise SpecError(
            f"JointSpec takes a sequence of specs (or write a & b), got {type(value).__name__}: "
            f"{value!r}"
        )
    parts: list[PatchSpec] = []
    for item in value:
        if isinstance(item, JointSpec):
            parts.extend(item.parts)
        elif isinstance(item, PatchSpec):
            parts.append(item)
        else:
            raise SpecError(f"a joint spec combines PatchSpecs, got {type(item).__name__}")
    return tuple(parts)


@attrs.frozen(repr=False)
class JointSpec(_Combinable):
    """Several specs patched together in the same forward pass, sweeping the product of cells.

    Axis names shared by several parts are numbered by part (``head_1``, ``head_2``) so every
    result dim stays distinct; a custom-rule axis whose own name would repeat a numbered one is
    refused.

    Example:
        >>> heads = PatchSpec("z", axes=("layer", "head"))
        >>> (heads & heads).dims
        ('layer_1', 'head_1', 'layer_2', 'head_2')
    """

    parts: tuple[PatchSpec, ...] = attrs.field(converter=_joint_parts)
    name: str | None = attrs.field(kw_only=True, default=None)

    def __attrs_post_init__(self) -> None:
        check_name("JointSpec", self.name)
        if len(self.parts) < 2:
            raise SpecError(f"a joint spec needs at least two parts, got {len(self.parts)}")
        owners: dict[str, tuple[int, str]] = {}
        for i, (part, dims) in enumerate(zip(self.parts, self.part_dims, strict=True)):
            for axis, dim in zip(part.axes, dims, strict=True):
                if dim in owners:
                    j, other = owners[dim]
                    raise SpecError(
                        f"joint spec dims clash: part {j + 1} ({self.parts[j].label!r}) axis "
                        f"{other!r} and part {i + 1} ({part.label!r}) axis {axis!r} would both be "
                        f"the result dim {dim!r} (axes shared by several parts are numbered by "
                        "part: head_1, head_2); rename the custom-rule axis so no numbered name "
                        "repeats"
                    )
                owners[dim] = (i, axis)
        receivers = {part.receiver for part in self.parts}
        if len(receivers) > 1:
            raise SpecError(
                "the parts of a joint spec must patch the same run; got sources "
                f"{[list(part.sources) for part in self.parts]} patching "
                f"{[part.receiver for part in self.parts]} (denoising and noising mixed)"
            )

    @property
    def part_dims(self) -> tuple[tuple[str, ...], ...]:
        """The result dims each part contributes, after numbering shared names."""
        counts: dict[str, int] = {}
        for part in self.parts:
            for axis in part.axes:
                counts[axis] = counts.get(axis, 0) + 1
        return tuple(
            tuple(f"{a}_{i + 1}" if counts[a] > 1 else a for a in part.axes)
            for i, part in enumerate(self.parts)
        )

    @property
    def dims(self) -> tuple[str, ...]:
        """Dims of the result: every part's dims in order."""
        return tuple(itertools.chain.from_iterable(self.part_dims))

    @property
    def label(self) -> str:
        """The joint spec's name, or its parts' labels joined by ``&``."""
        return self.name or "&".join(part.label for part in self.parts)

    @property
    def source(self) -> Source:
        """The first part's source (all parts patch the same run)."""
        return self.parts[0].source

    @property
    def sources(self) -> tuple[Source, ...]:
        """Every distinct source of the parts, in order."""
        return tuple(dict.fromkeys(s for part in self.parts for s in part.sources))

    @property
    def receiver(self) -> Receiver:
        """The run every part patches."""
        return self.parts[0].receiver


    def to_dict(self) -> dict[str, Any]:
        """A plain dict of the parts (see :meth:`PatchSpec.to_dict`)."""
        out: dict[str, Any] = {"joint": [part.to_dict() for part in self.parts]}
        if self.name is not None:
            out["name"] = self.name
        return out

    def __repr__(self) -> str:
        inner = " & ".join(repr(part) for part in self.parts)
        return inner if self.name is None else f"JointSpec(({inner}).parts, name={self.name!r})"


AnySpec: TypeAlias = PatchSpec | JointSpec


def spec_from_dict(data: Mapping[str, Any]) -> AnySpec:
    """Build a :class:`PatchSpec` or :class:`JointSpec` from its dict form.

    Raises:
        SpecError: not a dict, unknown or missing keys, a malformed part, or any error the
            constructors raise.

    Example:
        >>> spec_from_dict({"joint": [{"activation": "z", "axes": ["head"]},
        ...                           {"activation": "mlp_out", "axes": ["pos"]}]}).dims
        ('head', 'pos')
    """
    if isinstance(data, Mapping) and "joint" in data:
        parts = _listed(data, "joint", "a joint spec dict", "part", PatchSpec.from_dict)
        return JointSpec(parts=parts, name=data.get("name"))
    return PatchSpec.from_dict(data)


def _listed(
    data: Mapping[str, Any], key: str, what: str, item: str, build: Callable[[Any], Any]
) -> list[Any]:
    """The specs listed under ``key`` of a joint or sweep dict, each rebuilt with ``build``."""
    _fields(data, what, known=(key, "name"), required=(key,))
    listed = data[key]
    if not isinstance(listed, list | tuple):
        raise SpecError(
            f"{what}'s {key!r} must be a list of spec dicts, got {type(listed).__name__}: {listed!r}"
        )
    built = []
    for i, entry in enumerate(listed):
        try:
            built.append(build(entry))
        except SpecError as err:
            raise SpecError(f"{item} {i + 1} of {what}: {err}") from None
    return built


def as_specs(specs: Sequence[Any]) -> tuple[AnySpec, ...]:
    """Check that every item is a spec; used by :class:`~patchspec.Sweep`."""
    for item in specs:
        if not isinstance(item, PatchSpec | JointSpec):
            raise SpecError(f"expected a PatchSpec or JointSpec, got {type(item).__name__}: {item!r}")
    return tuple(specs)


def _sweep_specs(value: Sequence[Any]) -> tuple[AnySpec, ...]:
    if any(isinstance(item, list | tuple) for item in value):
        raise SpecError(
            "Sweep takes its specs as separate arguments: Sweep(a, b) or Sweep(*specs), "
            "not a list"
        )
    specs = as_specs(list(value))
    if not specs:
        raise SpecError("a Sweep needs at least one spec")
    names = [s.label for s in specs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise SpecError(f"specs in a Sweep need distinct names; {dupes} repeat (use .named())")
    return specs


@attrs.frozen(init=False, repr=False)
class Sweep:
    """Several specs run on the same prompts; the result is one labelled Dataset.

    A frozen value like :class:`PatchSpec`: hashable, comparable and serialisable.

    Args:
        *specs: :class:`~patchspec.PatchSpec` or :class:`~patchspec.JointSpec` values.
        name: Optional name, kept in the result's attrs.

    Raises:
        SpecError: no spec, a non-spec, or two specs of the same name.

    Example:
        >>> RESID_PRE = PatchSpec("resid_pre", axes=("layer", "pos"), name="resid_pre")
        >>> ATTN_OUT = PatchSpec("attn_out", axes=("layer", "pos"), name="attn_out")
        >>> Sweep(RESID_PRE, ATTN_OUT).names
        ('resid_pre', 'attn_out')
    """

    specs: tuple[AnySpec, ...] = attrs.field(converter=_sweep_specs)
    name: str | None = None

    def __init__(self, *specs: AnySpec, name: str | None = None) -> None:
        self.__attrs_init__(specs, name)  # type: ignore[attr-defined]

    def __attrs_post_init__(self) -> None:
        check_name("Sweep", self.name)

    @property
    def names(self) -> tuple[str, ...]:
        """The data variable name of each spec's result."""
        return tuple(s.label for s in self.specs)

    def __repr__(self) -> str:
        inner = ", ".join(repr(s) for s in self.specs)
        return f"Sweep({inner}{'' if self.name is None else f', name={self.name!r}'})"

    def to_dict(self) -> dict[str, Any]:
        """A plain dict of the specs (see :meth:`PatchSpec.to_dict`)."""
        out: dict[str, Any] = {"sweep": [spec.to_dict() for spec in self.specs]}
        if self.name is not None:
            out["name"] = self.name
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Sweep:
        """Rebuild a sweep from :meth:`to_dict` output.

        Raises:
            SpecError: not a dict, unknown or missing keys, a malformed spec, or any error the
                constructors raise.
        """
        specs = _listed(data, "sweep", "a sweep dict", "spec", spec_from_dict)
        return cls(*specs, name=data.get("name"))

    @checked_keywords
    def run(
        self,
        model: Any,
        clean: Prompts,
        corrupted: Prompts,
        metric: MetricArg,
        *,
        engine: str | Estimator | None = None,
        progress: bool | None = None,
        positions: PositionTable | tuple[PositionTable, PositionTable] | None = None,
        reference: Prompts | Mapping[str, Prompts] | None = None,
        tensors: Mapping[str, Any] | None = None,
        executor: str | Executor | None = None,
        cells_per_batch: int | None = None,
        max_memory: str | int | float | None = None,
        start_at_layer: bool = True,
        hash_weights: bool = False,
        estimator: str | Estimator | None = None,
        ig_steps: int | None = None,
        store: str | os.PathLike[str] | None = None,
    ) -> xr.Dataset:
        """Run every spec and return one Dataset with a data variable per spec.

        Args:
            model: A TransformerLens model (``TransformerBridge``) in eval mode, or a
                :class:`~patchspec.model.ModelAdapter` around one.
            clean: Clean prompts (strings) or tokens ``[batch, pos]``.
            corrupted: Corrupted prompts or tokens of the same shape.
            metric: A :class:`~patchspec.metrics.Metric` or a callable ``logits -> scalar |
                [batch]``; a per-prompt metric adds an ``example`` dim. A list or a mapping
                ``{name: metric}`` evaluates several metrics on the same forward passes and adds
                a ``metric`` dim (coordinates: the names).
            engine: The estimator: ``"batched"`` (default) or ``"reference"`` (one forward per
                cell), a registered name, or an :class:`~patchspec.execute.Estimator`.
            progress: Show a progress bar (default: one bar over the whole run, on a terminal or in a notebook, for 64 cells or more).
            positions: Named token positions, one index per prompt: ``{"S2": [3, 4], "END":
                -1}`` or a DataFrame with a column per name (a pair ``(clean, corrupted)`` when
                they differ between the runs). Position restrictions may then use the names,
                and a swept position axis without a restriction sweeps them. See
                :func:`patchspec.plan.resolve_positions`.
            reference: Prompts or tokens of a reference dataset for ``Mean(over="reference")``,
                or ``{name: prompts}`` for ``Mean(over=name)``.
            tensors: Run-time tensors that sources name by key, ``{name: tensor}``: the bases of
                :class:`~patchspec.interventions.Subspace`, the directions of
                :class:`~patchspec.interventions.Add`, the SAEs of
                :class:`~patchspec.interventions.SAELatent`. They never enter the spec; results
                record each one's shape and SHA-256 in ``attrs["tensors"]``.
            executor: Where chunks of cells run: ``"local"`` (default), an
                :class:`~patchspec.execute.Executor`, or a ``dask.distributed.Client`` (or a
                :class:`~patchspec.execute.distributed.DaskExecutor` around one) to run them
                on a cluster's workers.
            cells_per_batch: Cells per forward pass of the batched engine (default: from the
                memory budget).
            max_memory: Memory budget of one batched pass (bytes, or ``"2GB"``).
            start_at_layer: Start each batched pass at its cells' first patched block.
            hash_weights: Record a full SHA-256 of the weights (default: a cheap fingerprint).
            estimator: ``"exact"`` (default: exact patching, by ``engine``), ``"atp"``
                (attribution patching: every cell estimated to first order from one forward and
                one backward pass), ``"atp*"`` (AtP with the QK fix for query, key and score
                cells), ``"graddrop"`` (AtP* with GradDrop, one backward pass per layer: an
                unsigned ranking score, ``attrs["quantity"] == "score"``, not an estimate of
                the effect), ``"ig"`` (integrated gradients, ``ig_steps`` passes per hook
                point), or an :class:`~patchspec.execute.Estimator`. An estimate has the dims,
                coordinates and attrs of the exact result, with ``attrs["exact"] = False``;
                check its top cells with :func:`patchspec.verify`. See
                :mod:`patchspec.attribution`.
            ig_steps: Steps along the path for ``estimator="ig"`` (default 8).
            store: A zarr path that makes the sweep resumable: each finished chunk is written
                there as it arrives, and a rerun with the same store (same specs, model and
                inputs, else an error before any pass) computes only the chunks not yet in it.

        Returns:
            A Dataset whose variables are named after the specs; each has the spec's axes as
            dims, and its baselines and provenance in its attrs.

        Raises:
            PatchSpecError: bad spec, option, inputs, metric or model state (before any
                patched pass).
        """
        from patchspec import runner
        from patchspec.options import RunOptions

        options = RunOptions(
            engine=engine,
            executor=executor,
            progress=progress,
            cells_per_batch=cells_per_batch,
            max_memory=max_memory,
            start_at_layer=start_at_layer,
            hash_weights=hash_weights,
            estimator=estimator,
            ig_steps=ig_steps,
            store=store,
        )
        arrays = runner.run_specs(
            self.specs,
            model,
            clean,
            corrupted,
            metric,
            options=options,
            positions=positions,
            reference=reference,
            tensors=tensors,
        )
        return runner.to_dataset(self, arrays)


@checked_keywords
def run(
    spec: AnySpec,
    model: Any,
    clean: Prompts,
    corrupted: Prompts,
    metric: MetricArg,
    *,
    engine: str | Estimator | None = None,
    progress: bool | None = None,
    positions: PositionTable | tuple[PositionTable, PositionTable] | None = None,
    reference: Prompts | Mapping[str, Prompts] | None = None,
    tensors: Mapping[str, Any] | None = None,
    executor: str | Executor | None = None,
    cells_per_batch: int | None = None,
    max_memory: str | int | float | None = None,
    start_at_layer: bool = True,
    hash_weights: bool = False,
    estimator: str | Estimator | None = None,
    ig_steps: int | None = None,
    store: str | os.PathLike[str] | None = None,
) -> xr.DataArray:
    """Sweep one spec and return a labelled DataArray: ``spec.run(...)`` (see
    :meth:`Sweep.run` for the arguments)."""
    (checked,) = as_specs([spec])
    return checked.run(
        model,
        clean,
        corrupted,
        metric,
        engine=engine,
        progress=progress,
        positions=positions,
        reference=reference,
        tensors=tensors,
        executor=executor,
        cells_per_batch=cells_per_batch,
        max_memory=max_memory,
        start_at_layer=start_at_layer,
        hash_weights=hash_weights,
        estimator=estimator,
        ig_steps=ig_steps,
        store=store,
    )
