"""Path specs: which sender's effect reaches the metric through which receiver.

A :class:`PathSpec` is an immutable, serialisable value like :class:`~patchspec.PatchSpec`:
its senders are the cells of a patch spec (a head's ``z`` by layer and head, optionally by
position; an attention or MLP output, or the residual stream, by layer and optionally
position), its receivers the inputs of later components (a head's query, key or value input,
per key/value head for keys and values; an MLP's input; the final residual, i.e. the logits),
and ``through`` says which paths count: ``"direct"`` (the sender -> receiver edge alone) or
``"mlp"`` (also sender -> MLPs -> receiver, attention frozen; Wang et al. 2022). Running it
gives one DataArray over the sender dims (``sender_layer``, ``sender_head``, ...) and the
receiver dims (``receiver_layer``, ``receiver_head`` or ``receiver_kv_head``), NaN where the
receiver does not read the sender, with a boolean ``measured`` coordinate saying where.

This module imports neither torch nor TransformerLens.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import attrs

from patchspec.errors import SpecError, did_you_mean
from patchspec.sources import Clean, Corrupted
from patchspec.spec import PatchSpec

if TYPE_CHECKING:
    import xarray as xr

#: Sender activations, and their default axes.
SENDER_AXES: dict[str, tuple[str, ...]] = {
    "z": ("layer", "head"),
    "attn_out": ("layer",),
    "mlp_out": ("layer",),
    "resid_pre": ("layer",),
}
#: Receiver inputs, and their axes (keys and values: one receiver per key/value head).
RECEIVER_AXES: dict[str, tuple[str, ...]] = {
    "q": ("layer", "head"),
    "k": ("layer", "kv_head"),
    "v": ("layer", "kv_head"),
    "mlp_in": ("layer",),
    "logits": (),
}
#: Which paths count.
THROUGH = ("direct", "mlp")


def _sender(value: Any) -> PatchSpec:
    """A sender given as an activation name becomes the patch spec over its default axes."""
    if isinstance(value, str):
        if value not in SENDER_AXES:
            raise SpecError(
                f"sender {value!r} is not a sender activation (valid: {', '.join(SENDER_AXES)})"
                + did_you_mean(value, SENDER_AXES)
            )
        return PatchSpec(value, axes=SENDER_AXES[value])
    if isinstance(value, Mapping):
        return PatchSpec.from_dict(value)
    return value  # type: ignore[no-any-return]


def _check_sender(instance: Any, attribute: Any, value: Any) -> None:
    if not isinstance(value, PatchSpec):
        raise SpecError(
            f"sender must be an activation name ({', '.join(SENDER_AXES)}) or a PatchSpec, got "
            f"{type(value).__name__}: {value!r}"
        )
    if value.activation not in SENDER_AXES:
        raise SpecError(
            f"a path's sender must patch one of {', '.join(SENDER_AXES)}, got activation "
            f"{value.activation!r}" + did_you_mean(value.activation, SENDER_AXES)
        )
    allowed = ("layer", "head", "pos") if value.activation == "z" else ("layer", "pos")
    bad = [a for a in value.axes if a not in allowed]
    if bad or "layer" not in value.axes:
        raise SpecError(
            f"a {value.activation!r} sender sweeps 'layer' and optionally {allowed[1:]}, got "
            f"axes {value.axes}" + (did_you_mean(bad[0], allowed) if bad else "")
        )
    if value.rule is not None:
        raise SpecError("a path's sender cannot have a custom rule")
    unswept = [k for k, _ in value.restrictions if k not in value.axes]
    if unswept:
        raise SpecError(
            f"a path's sender restricts {unswept[0]!r} without sweeping it; sweep it "
            f"(axes=(..., {unswept[0]!r})) and restrict that axis"
        )
    if not isinstance(value.source, Clean | Corrupted):
        raise SpecError(
            f"a path's sender takes its values from the other run (Clean(): denoising, "
            f"Corrupted(): noising), got {value.source!r}"
        )


def _check_receiver(instance: Any, attribute: Any, value: Any) -> None:
    if value not in RECEIVER_AXES:
        raise SpecError(
            f"receiver {value!r} is not a receiver input (valid: {', '.join(RECEIVER_AXES)})"
            + did_you_mean(str(value), RECEIVER_AXES)
        )


def _check_through(instance: Any, attribute: Any, value: Any) -> None:
    if value not in THROUGH:
        raise SpecError(
            f"through must be one of {THROUGH}, got {value!r}" + did_you_mean(str(value), THROUGH)
        )


@attrs.frozen(kw_only=True, repr=False)
class PathSpec:
    """Path patching as a value: senders x receivers, direct or through MLPs.

    Args:
        sender: A :class:`~patchspec.PatchSpec` of ``z`` (axes ``layer``, ``head`` and
            optionally ``pos``), ``attn_out``, ``mlp_out`` or ``resid_pre`` (``layer`` and
            optionally ``pos``), restricted as usual with ``.sel``; or just the activation name
            (its default axes). Its source says the direction: ``Clean()`` (default) patches
            clean values into the corrupted run, ``Corrupted()`` the reverse.
        receiver: ``"q"``, ``"k"``, ``"v"`` (a head's pre-LayerNorm input; keys and values per
            key/value head), ``"mlp_in"`` (an MLP's pre-LayerNorm input) or ``"logits"`` (the
            final residual, before the final norm).
        through: ``"direct"`` (only the sender -> receiver edge carries the patched value) or
            ``"mlp"`` (the paths through MLPs too, every attention layer frozen).
        name: A label for results.

    Raises:
        SpecError: an unknown sender, receiver or ``through``, or a sender spec with other axes.

    Example:
        >>> spec = PathSpec(sender="z", receiver="k")
        >>> spec
        PathSpec(sender=PatchSpec('z', axes=('layer', 'head')), receiver='k', through='direct')
        >>> spec.dims
        ('sender_layer', 'sender_head', 'receiver_layer', 'receiver_kv_head')
        >>> PathSpec.from_dict(spec.to_dict()) == spec
        True
    """

    sender: PatchSpec = attrs.field(converter=_sender, validator=_check_sender)
    receiver: str = attrs.field(default="logits", validator=_check_receiver)
    through: str = attrs.field(default="direct", validator=_check_through)
    name: str | None = attrs.field(default=None)

    @property
    def sender_dims(self) -> tuple[str, ...]:
        """Result dims of the senders (``sender_layer`` ...)."""
        return tuple(f"sender_{a}" for a in self.sender.axes)

    @property
    def receiver_dims(self) -> tuple[str, ...]:
        """Result dims of the receivers (``receiver_layer`` ...)."""
        return tuple(f"receiver_{a}" for a in RECEIVER_AXES[self.receiver])

    @property
    def dims(self) -> tuple[str, ...]:
        """Result dims: the sender dims, then the receiver dims."""
        return (*self.sender_dims, *self.receiver_dims)

    @property
    def label(self) -> str:
        """The spec's name, or one derived from sender, receiver and ``through``."""
        via = "" if self.through == "direct" else "_via_mlp"
        return self.name or f"path_{self.sender.activation}_to_{self.receiver}{via}"

    @property
    def receiving_run(self) -> str:
        """The run that receives the patch (``"corrupted"`` for denoising)."""
        return self.sender.receiver

    def sel(self, **restrictions: Any) -> PathSpec:
        """A new spec whose senders are restricted (``layer=0``, ``head=[1, 2]``)."""
        return attrs.evolve(self, sender=self.sender.sel(**restrictions))

    def to_dict(self) -> dict[str, Any]:
        """A plain dict (JSON-friendly) that :meth:`from_dict` turns back into this spec."""
        out: dict[str, Any] = {
            "kind": "path",
            "sender": self.sender.to_dict(),
            "receiver": self.receiver,
            "through": self.through,
        }
        if self.name is not None:
            out["name"] = self.name
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PathSpec:
        """Build a spec from :meth:`to_dict` output.

        Raises:
            SpecError: unknown keys, or any error the constructor raises.
        """
        known = ("kind", "sender", "receiver", "through", "name")
        unknown = [k for k in data if k not in known]
        if unknown:
            raise SpecError(
                f"a path spec dict has unknown key {unknown[0]!r} (valid: {', '.join(known)})"
                + did_you_mean(str(unknown[0]), known)
            )
        if "sender" not in data:
            raise SpecError("a path spec dict needs a 'sender'")
        return cls(
            sender=data["sender"],
            receiver=data.get("receiver", "logits"),
            through=data.get("through", "direct"),
            name=data.get("name"),
        )

    def __repr__(self) -> str:
        args = [
            f"sender={self.sender!r}",
            f"receiver={self.receiver!r}",
            f"through={self.through!r}",
        ]
        if self.name is not None:
            args.append(f"name={self.name!r}")
        return f"PathSpec({', '.join(args)})"

    def run(
        self,
        model: Any,
        clean: Any,
        corrupted: Any,
        metric: Any,
        *,
        engine: str | None = None,
        progress: bool | None = None,
        positions: Any = None,
        cells_per_batch: int | None = None,
        max_memory: str | int | float | None = None,
        hash_weights: bool = False,
    ) -> xr.DataArray:
        """Patch every (sender, receiver) path and return a labelled DataArray.

        Args:
            model: A TransformerLens model (``TransformerBridge``) in eval mode.
            clean: Clean prompts (strings) or tokens ``[batch, pos]``.
            corrupted: Corrupted prompts or tokens.
            metric: A :class:`~patchspec.metrics.Metric` or a callable ``logits -> scalar |
                [batch]`` (a per-prompt metric adds an ``example`` dim; several, a ``metric``
                dim), as for :meth:`patchspec.PatchSpec.run`.
            engine: ``"batched"`` (default: many rows per pass, replayed from the receiver's
                layer) or ``"reference"`` (one full forward pass per (sender, receiver) pair).
            progress: Show a progress bar over the measured paths (default: for 64 paths or
                more, on a terminal).
            positions: Named token positions, as for :meth:`patchspec.PatchSpec.run`.
            cells_per_batch: Rows (sender, receiver pairs) per forward pass.
            max_memory: Memory budget of one pass, bytes or a string such as ``"2GB"``.
            hash_weights: Also record a SHA-256 of every weight.

        Returns:
            Dims :attr:`dims` (then ``metric``, ``example`` as for patch specs); NaN where the
            receiver does not read the sender, marked by the ``measured`` coordinate.

        Raises:
            PatchSpecError: bad inputs, metric, model or hooks, before any forward pass.
        """
        from patchspec.paths.run import run_path

        return run_path(
            self,
            model,
            clean,
            corrupted,
            metric,
            engine=engine,
            progress=progress,
            positions=positions,
            cells_per_batch=cells_per_batch,
            max_memory=max_memory,
            hash_weights=hash_weights,
        )
