"""PatchSpec: what to patch, as an immutable value.

A spec pairs an activation (see :mod:`patchspec.layouts`) with the named axes to sweep, optional
restrictions of any axis or dim, a slicing rule and a value source. It holds no model and no
tensors: it is hashable, comparable, printable and round-trips through a plain dict. Specs
combine with ``&`` into a :class:`JointSpec` that patches several regions in one forward pass.

This module imports neither torch nor TransformerLens.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeAlias

import attrs

from patchspec.errors import SpecError, did_you_mean
from patchspec.layouts import POSITION_DIMS, Layout, layout
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


@attrs.frozen
class Slice:
    """A hashable ``slice`` (Python 3.11 slices are not hashable)."""

    start: int | None = None
    stop: int | None = None
    step: int | None = None

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
    """Normalise one user-given restriction to a hashable :data:`Selector`."""
    if isinstance(value, slice):
        return Slice(value.start, value.stop, value.step)
    if isinstance(value, Slice):
        return value
    if isinstance(value, bool):
        raise SpecError(f"restriction {name}={value!r} is a bool; give an int, a list or a slice")
    if isinstance(value, str | int) or not isinstance(value, Iterable):
        if not isinstance(value, Hashable):
            raise SpecError(f"restriction {name}={value!r} is not hashable")
        return value
    values = tuple(value)
    if not values:
        raise SpecError(f"restriction {name}={value!r} selects nothing; give at least one value")
    if len(set(values)) != len(values):
        raise SpecError(f"restriction {name}={value!r} repeats a value; give each value once")
    return values


def _restrictions(value: Mapping[str, Any] | Iterable[tuple[str, Any]] | None) -> tuple:
    """Convert user restrictions to a sorted tuple of ``(name, Selector)`` pairs."""
    if value is None:
        return ()
    items = value.items() if isinstance(value, Mapping) else value
    return tuple(sorted((str(k), _selector(str(k), v)) for k, v in items))


def _axes(value: str | Iterable[str]) -> tuple[str, ...]:
    return (value,) if isinstance(value, str) else tuple(value)


def _explicit(selector: Selector) -> bool:
    """Whether a selector lists its values without needing a size (not a slice)."""
    return not isinstance(selector, Slice)


class _Combinable:
    """What both kinds of spec do: combine with ``&`` and run."""

    @property
    def parts(self) -> tuple[PatchSpec, ...]:
        raise NotImplementedError

    def __and__(self, other: PatchSpec | JointSpec) -> JointSpec:
        if not isinstance(other, PatchSpec | JointSpec):
            return NotImplemented
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
        executor: str | Executor | None = None,
        cells_per_batch: int | None = None,
        max_memory: str | int | float | None = None,
        start_at_layer: bool = True,
        hash_weights: bool = False,
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
            patched region instead (e.g. ``pos=-1``: patch only the last position).
        rule: Optional callable from a cell's coordinates (``{"layer": 3, "head": 1}``) to an
            index per activation dim; dims it leaves out are patched whole. By default each swept
            axis indexes the activation dim of the same name.
        source: Where patched values come from (default: the clean run, i.e. denoising).
        name: A label for results; derived from the activation and axes when omitted.

    Raises:
        SpecError: an unknown activation, an unknown or duplicate axis, or a bad restriction.

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
        restricted = dict(self.restrictions)
        seen: set[str] = set()
        for axis in self.axes:
            if not isinstance(axis, str):
                raise SpecError(f"axis {axis!r} must be a string naming a dim")
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
            if axis in lay.patch_dims:
                continue
            if self.rule is not None and axis in restricted and _explicit(restricted[axis]):
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
                raise SpecError(
                    f"restriction {key!r} is neither an axis nor a dim of activation "
                    f"{self.activation!r} (valid: {', '.join(lay.patch_dims)})"
                    f"{did_you_mean(key, lay.patch_dims)}"
                )
            if key in lay.patch_dims:
                _check_int_selector(key, selector)
        if not isinstance(self.source, Source):
            raise SpecError(
                f"source must be a patchspec.sources.Source, got {type(self.source).__name__}"
            )
        if self.rule is not None and not callable(self.rule):
            raise SpecError(f"rule must be callable, got {type(self.rule).__name__}")
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
        return (self.source,)

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
        known = {"activation", "axes", "restrictions", "source", "name"}
        unknown = set(data) - known
        if unknown:
            bad = sorted(unknown)[0]
            raise SpecError(
                f"unknown spec key {bad!r}; valid keys are {', '.join(sorted(known))}"
                f"{did_you_mean(bad, known)}"
            )
        if "activation" not in data or "axes" not in data:
            raise SpecError(f"a spec dict needs 'activation' and 'axes', got keys {sorted(data)}")
        restrictions = {
            k: _selector_from_plain(v) for k, v in dict(data.get("restrictions") or {}).items()
        }
        source = data.get("source")
        return cls(
            data["activation"],
            axes=tuple(data["axes"]),
            restrictions=restrictions,
            source=Clean() if source is None else source_from_dict(source),
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


def _selector_from_plain(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return [_selector_from_plain(v) for v in value]
    if isinstance(value, Mapping) and "kind" in value:
        return source_from_dict(value)
    if isinstance(value, Mapping):
        if set(value) != {"slice"}:
            raise SpecError(f"a restriction dict must be {{'slice': [start, stop, step]}}, got {value!r}")
        return slice(*value["slice"])
    return value


def _joint_parts(value: Iterable[PatchSpec | JointSpec]) -> tuple[PatchSpec, ...]:
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
    result dim stays distinct.

    Example:
        >>> heads = PatchSpec("z", axes=("layer", "head"))
        >>> (heads & heads).dims
        ('layer_1', 'head_1', 'layer_2', 'head_2')
    """

    parts: tuple[PatchSpec, ...] = attrs.field(converter=_joint_parts)
    name: str | None = attrs.field(kw_only=True, default=None)

    def __attrs_post_init__(self) -> None:
        if len(self.parts) < 2:
            raise SpecError(f"a joint spec needs at least two parts, got {len(self.parts)}")
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
    """Build a :class:`PatchSpec` or :class:`JointSpec` from its dict form."""
    if "joint" in data:
        return JointSpec(
            parts=[PatchSpec.from_dict(d) for d in data["joint"]], name=data.get("name")
        )
    return PatchSpec.from_dict(data)


def as_specs(specs: Sequence[Any]) -> tuple[AnySpec, ...]:
    """Check that every item is a spec; used by :class:`~patchspec.Sweep`."""
    for item in specs:
        if not isinstance(item, PatchSpec | JointSpec):
            raise SpecError(f"expected a PatchSpec or JointSpec, got {type(item).__name__}: {item!r}")
    return tuple(specs)


def _sweep_specs(value: Sequence[Any]) -> tuple[AnySpec, ...]:
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
        """Rebuild a sweep from :meth:`to_dict` output."""
        if "sweep" not in data:
            raise SpecError(f"a sweep dict needs a 'sweep' list of specs, got keys {sorted(data)}")
        return cls(*(spec_from_dict(d) for d in data["sweep"]), name=data.get("name"))

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
        executor: str | Executor | None = None,
        cells_per_batch: int | None = None,
        max_memory: str | int | float | None = None,
        start_at_layer: bool = True,
        hash_weights: bool = False,
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
            progress: Show a progress bar (default: for sweeps of 64 cells or more).
            positions: Named token positions, one index per prompt: ``{"S2": [3, 4], "END":
                -1}`` or a DataFrame with a column per name (a pair ``(clean, corrupted)`` when
                they differ between the runs). Position restrictions may then use the names,
                and a swept position axis without a restriction sweeps them. See
                :func:`patchspec.plan.resolve_positions`.
            reference: Prompts or tokens of a reference dataset for ``Mean(over="reference")``,
                or ``{name: prompts}`` for ``Mean(over=name)``.
            executor: Where chunks of cells run: ``"local"`` (default) or an
                :class:`~patchspec.execute.Executor`.
            cells_per_batch: Cells per forward pass of the batched engine (default: from the
                memory budget).
            max_memory: Memory budget of one batched pass (bytes, or ``"2GB"``).
            start_at_layer: Start each batched pass at its cells' first patched block.
            hash_weights: Record a full SHA-256 of the weights (default: a cheap fingerprint).

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
    executor: str | Executor | None = None,
    cells_per_batch: int | None = None,
    max_memory: str | int | float | None = None,
    start_at_layer: bool = True,
    hash_weights: bool = False,
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
        executor=executor,
        cells_per_batch=cells_per_batch,
        max_memory=max_memory,
        start_at_layer=start_at_layer,
        hash_weights=hash_weights,
    )
