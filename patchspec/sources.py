"""Where patched values come from.

A source is a small frozen value stored in a :class:`~patchspec.PatchSpec`. It names the run
that receives the patch (``receiver``) and produces the full activation tensor whose entries
inside the patched region are written into that run. Sources hold no tensors: anything they
need at run time (caches, a reference dataset) comes from :class:`~patchspec.runs.Runs`.

* :class:`Clean` — *denoising*: the clean run's activation is written into the corrupted run
  (the classic activation patching of Meng et al. 2022, "Locating and Editing Factual
  Associations in GPT", and Wang et al. 2022, "Interpretability in the Wild").
* :class:`Corrupted` — *noising*: the corrupted run's activation is written into the clean run.
* :class:`Zero` — zero ablation.
* :class:`Mean` — mean ablation: the mean over the receiving run's prompts, or over a reference
  dataset passed at run time (``run(..., reference=tokens)``).
* :class:`Resample` — resample ablation (Chan et al. 2022, "Causal Scrubbing"): each prompt gets
  the activation of another prompt, chosen by a seeded derangement.
* :class:`Gaussian` — causal tracing's noise (Meng et al. 2022): the receiving run's activation
  plus seeded Gaussian noise.

The ablation sources (zero, mean, resample, Gaussian) patch the clean run by default
(``receiver="clean"``): they ask how much the clean behaviour needs a component. Pass
``receiver="corrupted"`` to ablate inside the corrupted run instead.

Sources import no torch at module level, so specs stay light; values are computed lazily and
memoised per sweep (see :meth:`Runs.memo`).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol, TypeVar

import attrs

from patchspec.errors import InputError, SpecError, did_you_mean

if TYPE_CHECKING:
    import torch

Receiver = Literal["clean", "corrupted"]
RECEIVERS: tuple[Receiver, ...] = ("clean", "corrupted")

class Runs(Protocol):
    """What a source may read (implemented by :class:`patchspec.model.session.Session`)."""

    def activation(self, which: Receiver, hook_name: str) -> torch.Tensor:
        """The unpatched activation of one run at ``hook_name``."""
        ...

    def reference(self, name: str, hook_name: str) -> torch.Tensor:
        """The activation at ``hook_name`` of a reference dataset."""
        ...

    def real_mask(self, which: Receiver) -> torch.Tensor | None:
        """``[batch, pos]``: True at real tokens, False at padding (``None``: no padding)."""
        ...

    def reference_mask(self, name: str) -> torch.Tensor | None:
        """``[batch, pos]`` real tokens of a reference dataset (``None``: no padding)."""
        ...

    def position_axes(self, hook_name: str) -> tuple[int, ...]:
        """Axes of the activation at ``hook_name`` that index token positions."""
        ...

    def memo(self, key: Any, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        """``compute()``, computed once per sweep for each hashable ``key``."""
        ...

    def tensor(self, name: str) -> Any:
        """The run-time tensor (or SAE) passed as ``run(..., tensors={name: ...})``."""
        ...


class Inputs(Protocol):
    """What a source may check before any forward pass (a :class:`~patchspec.model.session.Session`)."""

    @property
    def batch(self) -> int:
        """Number of prompts."""
        ...

    def check_reference(self, name: str) -> None:
        """Raise unless the reference dataset ``name`` was given and fits the sweep's prompts."""
        ...

    def tensor(self, name: str) -> Any:
        """The run-time tensor passed as ``run(..., tensors={name: ...})`` (an InputError
        naming the keys given when there is none of that name)."""
        ...


#: A write that depends on the receiving activation: ``(act, values) -> new act`` (see
#: :meth:`Source.combine`); both broadcast against each other (``act`` may hold stacked copies).
Combine = Callable[["torch.Tensor", "torch.Tensor"], "torch.Tensor"]


@attrs.frozen
class Source:
    """Base class of value sources; subclasses set ``kind`` and implement :meth:`values`."""

    kind: ClassVar[str] = "source"
    #: Whether the values come from the other run (an interchange, as ``Clean``/``Corrupted``)
    #: rather than being made from the receiving run (an ablation). Where parts of a joint
    #: patch overlap, interchanges are written last and win.
    interchange: ClassVar[bool] = False
    #: Fields that a spec may sweep as an axis of the same name (``Subspace.strength``): each
    #: coordinate is this source with that field set (see :meth:`PatchSpec.sources`).
    sweepable: ClassVar[tuple[str, ...]] = ()
    #: Whether :meth:`combine` acts on each token position alone (the written value at a
    #: position depends only on the activation and values there). The batched engine then
    #: recomputes only the positions a patch can change (causal suffix replay); a custom source
    #: whose combine mixes positions keeps the default ``False`` and is replayed in full.
    positionwise: ClassVar[bool] = False

    def combine(self, hook_name: str, runs: Runs) -> Combine | None:
        """How patched values meet the receiving activation: ``None`` (the default) writes
        :meth:`values` as they are; a function ``(act, values) -> new`` makes the written value
        a function of the activation being patched (``h + s (h_src - h) P``), evaluated on the
        activation as it arrives at the hook, inside the patched region only. Every engine
        applies it the same way."""
        return None

    def tensor_keys(self) -> tuple[str, ...]:
        """The run-time tensors (``run(..., tensors=...)`` keys) this source reads."""
        return ()

    def extra_sites(self, sites: tuple[tuple[str, int], ...]) -> tuple[tuple[str, int], ...]:
        """``(activation, layer)`` sites read besides the patched ones (a source at another layer)."""
        return ()

    def check_sites(self, inputs: Inputs, sites: tuple[tuple[str, int], ...], sizes: Any) -> None:
        """Raise an :class:`~patchspec.errors.InputError` now if this source cannot patch these
        ``(activation, layer)`` sites of a model and input of these
        :class:`~patchspec.plan.sizes.Sizes` (e.g. a basis of the wrong width)."""

    def check(self, inputs: Inputs) -> None:
        """Raise an :class:`~patchspec.errors.InputError` now if :meth:`values` would fail on
        these inputs; called for every source of every spec before the first forward pass."""

    @property
    def receiver(self) -> Receiver:
        """The run that receives the patch (its tokens are run, its metric is measured)."""
        return "corrupted"

    def values(self, hook_name: str, runs: Runs) -> torch.Tensor:
        """The full activation tensor (batch first) to take patched values from."""
        raise NotImplementedError

    def needs(self) -> tuple[Receiver, ...]:
        """Which runs' caches :meth:`values` reads."""
        return ("clean",)

    @property
    def label(self) -> str:
        """A short, unique label: the kind plus every field that differs from its default.

        Example:
            >>> Gaussian(scale=0.5).label
            'gaussian(scale=0.5)'
        """
        changed = [
            f"{f.name}={getattr(self, f.name)!r}"
            for f in attrs.fields(type(self))
            if f.default is attrs.NOTHING or getattr(self, f.name) != f.default
        ]
        return f"{self.kind}({', '.join(changed)})" if changed else self.kind

    def to_dict(self) -> dict[str, Any]:
        """A plain dict that :func:`source_from_dict` turns back into this source."""
        return {"kind": self.kind, **attrs.asdict(self)}


@attrs.frozen
class Clean(Source):
    """Denoising: write the clean run's activation into the corrupted run (the default)."""

    kind: ClassVar[str] = "clean"
    interchange: ClassVar[bool] = True

    def values(self, hook_name: str, runs: Runs) -> torch.Tensor:
        """The clean run's activation."""
        return runs.activation("clean", hook_name)


@attrs.frozen
class Corrupted(Source):
    """Noising: write the corrupted run's activation into the clean run."""

    kind: ClassVar[str] = "corrupted"
    interchange: ClassVar[bool] = True

    @property
    def receiver(self) -> Receiver:
        """Noising patches the clean run."""
        return "clean"

    def values(self, hook_name: str, runs: Runs) -> torch.Tensor:
        """The corrupted run's activation."""
        return runs.activation("corrupted", hook_name)

    def needs(self) -> tuple[Receiver, ...]:
        """Noising reads the corrupted cache."""
        return ("corrupted",)


# --- validators ----------------------------------------------------------------------------
def _receiver(inst: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value not in RECEIVERS:
        raise SpecError(
            f"{type(inst).__name__}.{attribute.name} must be 'clean' or 'corrupted', got {value!r}"
        )


def _optional_receiver(inst: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is not None:
        _receiver(inst, attribute, value)


def _seed(inst: Any, attribute: attrs.Attribute, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise SpecError(
            f"{type(inst).__name__}.{attribute.name} must be a non-negative int, got {value!r}"
        )


def _scale(inst: Any, attribute: attrs.Attribute, value: Any) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise SpecError(
            f"{type(inst).__name__}.{attribute.name} must be a positive finite number, "
            f"got {value!r}"
        )


def _flag(inst: Any, attribute: attrs.Attribute, value: Any) -> None:
    if not isinstance(value, bool):
        raise SpecError(
            f"{type(inst).__name__}.{attribute.name} must be True or False, got {value!r}"
        )


def _over(inst: Any, attribute: attrs.Attribute, value: Any) -> None:
    if not isinstance(value, str) or not value:
        raise SpecError(
            f"Mean.over must be 'batch' or the name of a reference dataset (a non-empty "
            f"string), got {value!r}"
        )


def _receiving(source: Any, hook_name: str, runs: Runs) -> torch.Tensor:
    return runs.activation(source.receiver, hook_name)


def _real_mean(
    act: torch.Tensor, mask: torch.Tensor | None, position_axes: tuple[int, ...]
) -> torch.Tensor:
    """The mean over prompts (dim 0) at each position of the prompts real there."""
    if mask is None:
        return act.mean(0, keepdim=True)
    shape = [mask.shape[0]] + [1] * (act.ndim - 1)
    shape[position_axes[0]] = mask.shape[1]
    weight = mask.to(act.dtype).view(shape)
    return (act * weight).sum(0, keepdim=True) / weight.sum(0, keepdim=True).clamp(min=1)


def _real_std(act: torch.Tensor, mask: torch.Tensor | None, position_axes: tuple[int, ...]) -> float:
    """The standard deviation of ``act`` over every prompt, real position and feature."""
    if mask is None:
        return float(act.float().std())
    shape = [mask.shape[0]] + [1] * (act.ndim - 1)
    for axis in position_axes[:1]:
        shape[axis] = mask.shape[1]
    keep = mask.view(shape).expand_as(act)
    return float(act.float()[keep].std())


def pos_axis(hook_name: str) -> int:
    """The first axis of the activation at ``hook_name`` that indexes positions.

    Read from the activation's layout (see :attr:`patchspec.layouts.Layout.position_dims`).

    Example:
        >>> pos_axis("blocks.0.attn.hook_pattern")
        2
    """
    from patchspec.model.adapter import layout_of

    row = layout_of(hook_name)
    return row.position_dims[0] if row is not None and row.position_dims else 1


# --- ablations -------------------------------------------------------------------------------
@attrs.frozen
class Zero(Source):
    """Zero ablation: the patched region is set to zero.

    Args:
        receiver: The run that is ablated (default ``"clean"``).

    Example:
        >>> PatchSpec("z", axes=("layer", "head")).using(Zero())  # doctest: +SKIP
    """

    kind: ClassVar[str] = "zero"
    receiver: Receiver = attrs.field(default="clean", validator=_receiver)  # type: ignore[assignment]

    def values(self, hook_name: str, runs: Runs) -> torch.Tensor:
        """Zeros shaped like the receiving run's activation."""
        import torch

        act = _receiving(self, hook_name, runs)
        return torch.zeros((), dtype=act.dtype, device=act.device).expand_as(act)

    def needs(self) -> tuple[Receiver, ...]:
        """Only the receiving run."""
        return (self.receiver,)


@attrs.frozen
class Mean(Source):
    """Mean ablation: the patched region is set to a mean activation.

    ``over="batch"`` (default) averages the receiving run's activation over its prompts, at each
    position separately; pad positions of prompts padded to a common length are left out of the
    average. Any other value names a reference dataset given at run time, either
    ``run(..., reference=tokens)`` (the name ``"reference"``) or ``run(..., reference={"name":
    tokens, ...})``; its prompts must have the sweep's sequence length (their padding, if any, is
    left out of the average too). The tensors never live in the spec, so it stays hashable and serialisable.

    Args:
        over: ``"batch"`` or the name of a reference dataset.
        receiver: The run that is ablated (default ``"clean"``).

    Example:
        >>> Mean(over="reference").to_dict()
        {'kind': 'mean', 'over': 'reference', 'receiver': 'clean'}
    """

    kind: ClassVar[str] = "mean"
    over: str = attrs.field(default="batch", validator=_over)
    receiver: Receiver = attrs.field(default="clean", validator=_receiver)  # type: ignore[assignment]

    def values(self, hook_name: str, runs: Runs) -> torch.Tensor:
        """The mean activation, broadcast to the receiving run's shape."""
        act = _receiving(self, hook_name, runs)
        mean = runs.memo((self, hook_name), lambda: self._mean(hook_name, runs, act))
        return mean.expand_as(act)

    def _mean(self, hook_name: str, runs: Runs, act: torch.Tensor) -> torch.Tensor:
        if self.over == "batch":
            return _real_mean(act, runs.real_mask(self.receiver), runs.position_axes(hook_name))
        ref = runs.reference(self.over, hook_name)
        if ref.shape[1:] != act.shape[1:]:
            raise InputError(
                f"reference dataset {self.over!r} gives activation {hook_name!r} of shape "
                f"{tuple(ref.shape)}, but the sweep's prompts give {tuple(act.shape)}; a mean "
                "over a reference dataset needs prompts of the same token length"
            )
        mask = runs.reference_mask(self.over)
        return _real_mean(ref, mask, runs.position_axes(hook_name)).to(act.dtype)

    def needs(self) -> tuple[Receiver, ...]:
        """Only the receiving run."""
        return (self.receiver,)

    def check(self, inputs: Inputs) -> None:
        """A reference dataset must have been given, with the sweep's token length."""
        if self.over != "batch":
            inputs.check_reference(self.over)


@attrs.frozen
class Resample(Source):
    """Resample ablation: each prompt gets the activation of *another* prompt.

    Prompt ``b`` of the receiving run receives, at the same token index, the activation of
    prompt ``permutation(batch)[b]`` of the ``donor`` run. The permutation is a derangement (no
    prompt keeps its own activation) drawn from ``torch.Generator().manual_seed(seed)`` by
    rejection from ``torch.randperm``; it depends only on ``seed`` and the number of prompts, so
    every hook and every cell of a sweep uses the same one. At least two prompts are needed.

    Args:
        seed: Seed of the permutation.
        donor: The run whose activations are resampled (default: the receiving run; use
            ``donor="corrupted"`` to resample corrupted prompts into the clean run).
        receiver: The run that is ablated (default ``"clean"``).

    Example:
        >>> Resample(seed=0).permutation(4)
        (3, 2, 0, 1)
    """

    kind: ClassVar[str] = "resample"
    seed: int = attrs.field(default=0, validator=_seed)
    donor: Receiver | None = attrs.field(default=None, validator=_optional_receiver)
    receiver: Receiver = attrs.field(default="clean", validator=_receiver)  # type: ignore[assignment]

    def permutation(self, batch: int) -> tuple[int, ...]:
        """The donor prompt of each receiving prompt: a seeded derangement of ``range(batch)``.

        Raises:
            InputError: fewer than two prompts.
        """
        import torch

        if batch < 2:
            raise InputError(
                f"Resample needs at least two prompts to take each prompt's activation from "
                f"another one, got {batch}"
            )
        gen = torch.Generator().manual_seed(self.seed)
        identity = torch.arange(batch)
        while True:
            perm = torch.randperm(batch, generator=gen)
            if not bool((perm == identity).any()):
                return tuple(int(i) for i in perm)

    def check(self, inputs: Inputs) -> None:
        """At least two prompts."""
        self.permutation(inputs.batch)

    def values(self, hook_name: str, runs: Runs) -> torch.Tensor:
        """The donor run's activation with its prompts permuted."""
        import torch

        act = runs.activation(self.donor or self.receiver, hook_name)

        def compute() -> torch.Tensor:
            return act[torch.tensor(self.permutation(act.shape[0]), device=act.device)]

        return runs.memo((self, hook_name), compute)

    def needs(self) -> tuple[Receiver, ...]:
        """The donor run."""
        return (self.donor or self.receiver,)


@attrs.frozen
class Gaussian(Source):
    """Causal tracing's corruption: the receiving run's activation plus Gaussian noise.

    The noise is standard normal times ``scale``, or times ``scale`` x the standard deviation of
    the receiving run's activation at that hook (over all its prompts, real positions and features)
    when ``relative=True``; Meng et al. 2022 ("Locating and Editing Factual Associations in
    GPT") add noise of 3 x the embeddings' standard deviation to the subject tokens, i.e.
    ``Gaussian(scale=3, relative=True)`` on ``resid_pre`` at layer 0 restricted to those
    positions. The noise is drawn in float32 on the CPU from
    ``torch.Generator().manual_seed(h)``, where ``h`` hashes ``seed`` and the hook name, so it
    is the same on every device and in every cell, and differs between hooks and seeds.

    Args:
        scale: Standard deviation of the noise (absolute, or relative: see above).
        seed: Seed of the noise.
        relative: Multiply ``scale`` by the activation's standard deviation.
        receiver: The run the noise is added to (default ``"clean"``).

    Example:
        >>> Gaussian(scale=3, relative=True).label
        'gaussian(scale=3, relative=True)'
    """

    kind: ClassVar[str] = "gaussian"
    scale: float = attrs.field(validator=_scale)
    seed: int = attrs.field(default=0, validator=_seed)
    relative: bool = attrs.field(default=False, validator=_flag)
    receiver: Receiver = attrs.field(default="clean", validator=_receiver)  # type: ignore[assignment]

    def noise(self, hook_name: str, shape: tuple[int, ...]) -> torch.Tensor:
        """The unscaled standard-normal noise for ``hook_name`` (float32, CPU)."""
        import torch

        digest = hashlib.sha256(f"{self.seed}:{hook_name}".encode()).digest()
        gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
        return torch.randn(shape, generator=gen, dtype=torch.float32)

    def values(self, hook_name: str, runs: Runs) -> torch.Tensor:
        """The receiving run's activation plus the seeded noise."""
        act = _receiving(self, hook_name, runs)

        def compute() -> torch.Tensor:
            mask, axes = runs.real_mask(self.receiver), runs.position_axes(hook_name)
            std = _real_std(act, mask, axes) if self.relative else 1.0
            noise = self.noise(hook_name, tuple(act.shape)).to(act.device)
            return (act.float() + noise * (self.scale * std)).to(act.dtype)

        return runs.memo((self, hook_name), compute)

    def needs(self) -> tuple[Receiver, ...]:
        """Only the receiving run."""
        return (self.receiver,)


SOURCES: dict[str, type[Source]] = {}

S = TypeVar("S", bound=type[Source])


def register_source(cls: S) -> S:
    """Class decorator making a :class:`Source` subclass loadable by :func:`source_from_dict`.

    Example:
        >>> @register_source
        ... @attrs.frozen
        ... class Ones(Zero):
        ...     kind: ClassVar[str] = "ones"
    """
    SOURCES[cls.kind] = cls
    return cls


for _cls in (Clean, Corrupted, Zero, Mean, Resample, Gaussian):
    register_source(_cls)


def source_from_dict(data: Mapping[str, Any]) -> Source:
    """Rebuild a source from :meth:`Source.to_dict` output.

    Raises:
        SpecError: the ``kind`` is unknown, or a field is unknown or invalid.

    Example:
        >>> source_from_dict({"kind": "gaussian", "scale": 0.1})
        Gaussian(scale=0.1, seed=0, relative=False, receiver='clean')
    """
    if not isinstance(data, Mapping):
        raise SpecError(f"a source is a dict with a 'kind', got {type(data).__name__}: {data!r}")
    fields = dict(data)
    kind = fields.pop("kind", None)
    if not isinstance(kind, str) or kind not in SOURCES:
        raise SpecError(
            f"unknown source kind {kind!r}; valid kinds are {', '.join(SOURCES)}"
            f"{did_you_mean(str(kind), SOURCES)}"
        )
    cls = SOURCES[kind]
    valid = [f.name for f in attrs.fields(cls)]
    for name in fields:
        if name not in valid:
            raise SpecError(
                f"unknown field {name!r} for source kind {kind!r}; valid fields are "
                f"{', '.join(valid) or 'none'}{did_you_mean(name, valid)}"
            )
    try:
        return cls(**fields)
    except TypeError as err:
        raise SpecError(f"bad fields {fields!r} for source kind {kind!r}: {err}") from None


def source_labels(sources: tuple[Source, ...]) -> tuple[str, ...]:
    """The coordinate labels of a swept ``source`` axis (see :attr:`Source.label`)."""
    return tuple(source.label for source in sources)
