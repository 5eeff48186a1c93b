"""Patch types on directions and features: subspaces, additive steering, SAE latents.

Each is a :class:`~patchspec.sources.Source` whose written value is a function of the receiving
activation (:meth:`~patchspec.sources.Source.combine`), so it composes with every activation,
axis, restriction, joint spec and engine like the ablations do:

* :class:`Subspace` — an interchange intervention on a linear subspace (Geiger et al. 2021,
  "Causal Abstractions of Neural Networks"; TransformerLens 4.3's ``SubspaceInterchange``):
  ``h' = h + s (h_src - h) B B^T``, ``B`` an orthonormal basis of the span of the given one. The
  source site may differ from the patched one (``source_layer``, ``source_pos``).
* :class:`Add` — additive steering (Turner et al. 2023, "Activation Addition"):
  ``h' = h + coef * d`` at the patched positions.
* :class:`SAELatent` — patch chosen latents of a sparse autoencoder (Bricken et al. 2023,
  "Towards Monosemanticity"; Cunningham et al. 2023) and keep its reconstruction error, as
  SAELens's ``use_error_term`` does: ``x' = x + (z'_L - z_L) W_dec[L]``.

Specs hold only a tensor's *key*; the tensors are passed at run time,
``spec.run(..., tensors={"B": basis})``, checked before any forward pass, and recorded in
results by shape and SHA-256 (``attrs["tensors"]``), never by value. A field listed in a type's
``sweepable`` may be swept as an axis of the same name (``strength``, ``coef``, ``latent``)::

    PatchSpec("resid_pre", axes=("strength", "layer", "pos"),
              restrictions={"strength": [0.0, 0.5, 1.0]}, source=Subspace("B"))
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import attrs

from patchspec.errors import InputError, SpecError
from patchspec.sources import RECEIVERS, Combine, Inputs, Receiver, Runs, Source, register_source

if TYPE_CHECKING:
    import torch
    from jaxtyping import Float

    from patchspec.plan.sizes import Sizes

__all__ = [
    "Add",
    "SAELatent",
    "SAEWeights",
    "Subspace",
    "orthonormal_basis",
    "read_tensors",
    "sae_weights",
    "save_tensors",
    "steered_text",
    "tensor_record",
]


# --- validators ----------------------------------------------------------------------------
def _key(inst: Any, attribute: attrs.Attribute, value: Any) -> None:
    if not isinstance(value, str) or not value:
        raise SpecError(
            f"{type(inst).__name__}.{attribute.name} names a run-time tensor: give a non-empty "
            f"string key (pass the tensor as run(..., tensors={{key: tensor}})), got {value!r}"
        )


def _number(inst: Any, attribute: attrs.Attribute, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise SpecError(
            f"{type(inst).__name__}.{attribute.name} must be a finite number, got {value!r}"
        )


def _plain_number(value: Any) -> Any:
    from patchspec.spec import plain_value

    return plain_value(value)


def _donor(inst: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value not in RECEIVERS:
        raise SpecError(
            f"{type(inst).__name__}.{attribute.name} must be 'clean' or 'corrupted', got {value!r}"
        )


def _optional_index(inst: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise SpecError(
            f"{type(inst).__name__}.{attribute.name} must be a non-negative int or None, "
            f"got {value!r}"
        )


def _flag(inst: Any, attribute: attrs.Attribute, value: Any) -> None:
    if not isinstance(value, bool):
        raise SpecError(f"{type(inst).__name__}.{attribute.name} must be True or False, got {value!r}")


def _latents(value: Any) -> Any:
    from patchspec.spec import plain_value

    value = plain_value(value)
    if isinstance(value, list | tuple):
        return tuple(plain_value(v) for v in value)
    return value


def _latent(inst: Any, attribute: attrs.Attribute, value: Any) -> None:
    values = value if isinstance(value, tuple) else (() if value is None else (value,))
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise SpecError(
                f"SAELatent.latent must be None, a non-negative int or a list of them, got {value!r}"
            )
    if len(set(values)) != len(values):
        raise SpecError(f"SAELatent.latent {value!r} names a latent twice; give each once")


def _other(run: Receiver) -> Receiver:
    return "corrupted" if run == "clean" else "clean"


# --- run-time tensors ----------------------------------------------------------------------
def _as_tensor(value: Any, what: str) -> torch.Tensor:
    import torch

    if isinstance(value, torch.Tensor):
        return value.detach()
    try:
        out = torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError):
        raise InputError(f"{what} must be a tensor (or array), got {type(value).__name__}") from None
    if not (out.is_floating_point() or out.dtype in (torch.int32, torch.int64)):
        raise InputError(f"{what} must hold numbers, got dtype {out.dtype}")
    return out


def _width(sizes: Sizes, activation: str) -> tuple[str, int]:
    """The last dim of ``activation`` and its size: what a basis or direction spans."""
    from patchspec.layouts import layout

    dim = layout(activation).dims[-1]
    return dim, sizes.size(dim)


def orthonormal_basis(
    basis: Float[torch.Tensor, "width rank"] | Float[torch.Tensor, " width"],
    width: int,
    *,
    name: str = "basis",
) -> Float[torch.Tensor, "width rank"]:
    """An orthonormal basis (float64) of the span of ``basis``'s columns, by QR.

    Args:
        basis: ``[width, rank]`` columns spanning the subspace (TransformerLens's convention), or
            one direction ``[width]``.
        width: The size of the activation's last dim.
        name: The tensor's key, for errors.

    Raises:
        InputError: not 1-D or 2-D, the wrong width, more columns than the width, non-finite
            entries, or columns that are linearly dependent (a degenerate basis).

    Example:
        >>> import torch
        >>> orthonormal_basis(torch.tensor([[2.0], [0.0]]), 2).abs().tolist()
        [[1.0], [0.0]]
    """
    import torch

    b = _as_tensor(basis, f"tensor {name!r}").to(torch.float64)
    if b.ndim == 1:
        b = b[:, None]
    if b.ndim != 2:
        raise InputError(
            f"basis {name!r} must be [width, rank] (or one direction [width]), got shape "
            f"{tuple(b.shape)}"
        )
    if b.shape[0] != width:
        flipped = " (transposed? columns span the subspace)" if b.shape[1] == width else ""
        raise InputError(
            f"basis {name!r} has shape {tuple(b.shape)}, but the activation's last dim has "
            f"{width} entries; give it as [{width}, rank]{flipped}"
        )
    rank = b.shape[1]
    if not 1 <= rank <= width:
        raise InputError(f"basis {name!r} has {rank} columns; give 1 to {width}")
    if not bool(torch.isfinite(b).all()):
        raise InputError(f"basis {name!r} has non-finite entries")
    q, r = torch.linalg.qr(b)
    diag = r.diagonal().abs()
    scale = float(torch.linalg.matrix_norm(b, ord=2))
    tol = max(width, rank) * torch.finfo(torch.float64).eps * 1e3 * max(scale, 1e-300)
    if scale == 0 or bool((diag <= tol).any()):
        found = int(torch.linalg.matrix_rank(b))
        raise InputError(
            f"basis {name!r} is degenerate: its {rank} columns span only {found} dimension(s); "
            "give linearly independent columns"
        )
    return q


def _digest(tensors: Mapping[str, torch.Tensor]) -> str:
    from patchspec.results import _hash_tensor

    hasher = hashlib.sha256()
    for part, tensor in tensors.items():
        hasher.update(part.encode())
        _hash_tensor(hasher, tensor)
    return hasher.hexdigest()


def tensor_record(value: Any) -> dict[str, Any]:
    """How results record a run-time tensor: its shape, dtype and SHA-256 (never its values);
    an SAE records each of its tensors' shapes and one hash over them.

    Example:
        >>> import torch
        >>> record = tensor_record(torch.zeros(3, 2))
        >>> record["shape"], record["dtype"], len(record["sha256"])
        ([3, 2], 'torch.float32', 64)
    """
    import torch

    if isinstance(value, torch.Tensor):
        t = value.detach()
        return {"shape": list(t.shape), "dtype": str(t.dtype), "sha256": _digest({"": t})}
    weights = sae_weights(value)
    parts = weights.tensors()
    return {
        "kind": "sae",
        "shapes": {k: list(v.shape) for k, v in parts.items()},
        "sha256": _digest(parts),
    }


@attrs.frozen(eq=False)
class SAEWeights:
    """A sparse autoencoder's tensors: ``z = f((x - b_dec?) W_enc + b_enc)``, ``x̂ = z W_dec + b_dec``.

    ``f`` is ReLU, or JumpReLU when ``threshold`` is given (``z = pre * (pre > threshold)``).

    Attributes:
        W_enc: ``[d_in, d_sae]``.
        W_dec: ``[d_sae, d_in]``.
        b_enc: ``[d_sae]``.
        b_dec: ``[d_in]``.
        threshold: ``[d_sae]`` JumpReLU thresholds, or ``None`` for ReLU.
        apply_b_dec_to_input: Subtract ``b_dec`` from the input before encoding.
    """

    W_enc: torch.Tensor
    W_dec: torch.Tensor
    b_enc: torch.Tensor
    b_dec: torch.Tensor
    threshold: torch.Tensor | None = None
    apply_b_dec_to_input: bool = False

    @property
    def d_in(self) -> int:
        """The width of the activation the SAE reads."""
        return int(self.W_enc.shape[0])

    @property
    def d_sae(self) -> int:
        """The number of latents."""
        return int(self.W_enc.shape[1])

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor by name (``threshold`` only when given)."""
        out = {"W_enc": self.W_enc, "W_dec": self.W_dec, "b_enc": self.b_enc, "b_dec": self.b_dec}
        if self.threshold is not None:
            out["threshold"] = self.threshold
        return out

    def encode(self, x: torch.Tensor, latents: torch.Tensor | None = None) -> torch.Tensor:
        """The latents ``z`` (only those indexed by ``latents`` when given) of ``x [..., d_in]``."""
        w, b = self.W_enc, self.b_enc
        t = self.threshold
        if latents is not None:
            w, b = w[:, latents], b[latents]
            t = None if t is None else t[latents]
        w, b = w.to(x.dtype), b.to(x.dtype)
        if self.apply_b_dec_to_input:
            x = x - self.b_dec.to(x.dtype)
        pre = x @ w + b
        if t is None:
            return pre.relu()
        return pre * (pre > t.to(x.dtype))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """The reconstruction ``x̂ = z W_dec + b_dec``."""
        return z @ self.W_dec.to(z.dtype) + self.b_dec.to(z.dtype)


_SAE_NAMES = ("W_enc", "W_dec", "b_enc", "b_dec")


def sae_weights(value: Any, name: str = "sae") -> SAEWeights:
    """An :class:`SAEWeights` from a mapping of tensors or an SAE object (e.g. ``sae_lens``'s
    ``SAE``, read by its ``W_enc``, ``W_dec``, ``b_enc``, ``b_dec``, ``threshold`` attributes and
    ``cfg.apply_b_dec_to_input``; no import of ``sae_lens`` is needed).

    Raises:
        InputError: a tensor is missing or the shapes do not fit together, or the SAE's
            activation is not ReLU or JumpReLU (e.g. top-k, whose latents depend on each other).

    Example:
        >>> import torch
        >>> sae = sae_weights({"W_enc": torch.eye(2), "W_dec": torch.eye(2),
        ...                    "b_enc": torch.zeros(2), "b_dec": torch.zeros(2)})
        >>> sae.d_in, sae.d_sae
        (2, 2)
    """
    if isinstance(value, SAEWeights):
        return value
    if isinstance(value, Mapping):
        get = value.get
        cfg: Any = None
        flag = value.get("apply_b_dec_to_input", False)
    else:
        def get(key: str, default: Any = None) -> Any:
            return getattr(value, key, default)

        cfg = getattr(value, "cfg", None)
        flag = getattr(cfg, "apply_b_dec_to_input", False)
    missing = [k for k in _SAE_NAMES if get(k) is None]
    if missing:
        raise InputError(
            f"SAE {name!r} has no {', '.join(missing)}; give a dict of tensors W_enc [d_in, "
            f"d_sae], W_dec [d_sae, d_in], b_enc [d_sae], b_dec [d_in] (and threshold [d_sae] "
            f"for JumpReLU), or an SAE object with those attributes; got {type(value).__name__}"
        )
    architecture = getattr(cfg, "architecture", None)
    if callable(architecture):
        architecture = architecture()
    if architecture not in (None, "standard", "jumprelu", "gated"):
        raise InputError(
            f"SAE {name!r} has architecture {architecture!r}; only ReLU ('standard') and "
            "JumpReLU SAEs can be patched one latent at a time"
        )
    threshold = get("threshold")
    tensors = {k: _as_tensor(get(k), f"SAE {name!r} {k}") for k in _SAE_NAMES}
    thr = None if threshold is None else _as_tensor(threshold, f"SAE {name!r} threshold")
    d_in, d_sae = tensors["W_enc"].shape if tensors["W_enc"].ndim == 2 else (-1, -1)
    want = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_enc": (d_sae,), "b_dec": (d_in,)}
    if thr is not None:
        want["threshold"] = (d_sae,)
    for key, shape in want.items():
        got = tuple((thr if key == "threshold" else tensors[key]).shape)  # type: ignore[union-attr]
        if got != shape or d_in < 0:
            raise InputError(
                f"SAE {name!r} {key} has shape {got}, expected {shape} (from W_enc "
                f"[d_in, d_sae] = {tuple(tensors['W_enc'].shape)})"
            )
    return SAEWeights(**tensors, threshold=thr, apply_b_dec_to_input=bool(flag))


def _on(tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return tensor.to(device=like.device)


def _receiving_device(source: Source, hook_name: str, runs: Runs) -> torch.Tensor:
    return runs.activation(source.receiver, hook_name)


# --- the patch types -------------------------------------------------------------------------
@register_source
@attrs.frozen
class Subspace(Source):
    """Interchange inside a subspace: ``h' = h + strength * (h_src - h) B B^T``.

    ``B`` is an orthonormal basis (QR) of the span of the columns of the run-time tensor named
    ``basis`` (``[width, rank]``, TransformerLens's convention, or one direction ``[width]``),
    width being the size of the activation's last dim (``d_model``, ``d_head``, ``neuron``).
    Outside the subspace the receiving run keeps its own activation. ``strength=0`` is no patch;
    a basis of the whole space with ``strength=1`` is the plain patch from ``donor``.

    Args:
        basis: Key of the basis in ``run(..., tensors=...)``.
        strength: ``s``; sweepable as an axis ``strength``.
        donor: The run ``h_src`` comes from (``"clean"``, the default, patches the corrupted
            run: denoising; ``"corrupted"`` patches the clean run).
        source_layer: Read ``h_src`` at this layer of the same activation instead of the
            patched layer.
        source_pos: Read ``h_src`` at this token index (of the activation's first position dim)
            for every patched position.

    Example:
        >>> Subspace("B", strength=0.5).to_dict()
        {'kind': 'subspace', 'basis': 'B', 'strength': 0.5, 'donor': 'clean', 'source_layer': None, 'source_pos': None}
    """

    kind: ClassVar[str] = "subspace"
    interchange: ClassVar[bool] = True
    sweepable: ClassVar[tuple[str, ...]] = ("strength",)
    positionwise: ClassVar[bool] = True
    basis: str = attrs.field(validator=_key)
    strength: float = attrs.field(default=1.0, converter=_plain_number, validator=_number)
    donor: Receiver = attrs.field(default="clean", validator=_donor)
    source_layer: int | None = attrs.field(default=None, validator=_optional_index)
    source_pos: int | None = attrs.field(default=None, validator=_optional_index)

    @property
    def receiver(self) -> Receiver:
        """The run that is not the donor."""
        return _other(self.donor)

    def needs(self) -> tuple[Receiver, ...]:
        """The donor run."""
        return (self.donor,)

    def tensor_keys(self) -> tuple[str, ...]:
        """The basis."""
        return (self.basis,)

    def extra_sites(self, sites: tuple[tuple[str, int], ...]) -> tuple[tuple[str, int], ...]:
        """The source layer of every patched activation."""
        if self.source_layer is None:
            return ()
        return tuple(dict.fromkeys((activation, self.source_layer) for activation, _ in sites))

    def check_sites(self, inputs: Inputs, sites: tuple[tuple[str, int], ...], sizes: Sizes) -> None:
        """The basis fits every patched activation; the source layer and position exist."""
        if self.source_layer is not None and self.source_layer >= sizes.n_layers:
            raise InputError(
                f"Subspace.source_layer={self.source_layer} is outside the model's layers "
                f"0..{sizes.n_layers - 1}"
            )
        if self.source_pos is not None and self.source_pos >= sizes.seq:
            raise InputError(
                f"Subspace.source_pos={self.source_pos} is outside the prompts' positions "
                f"0..{sizes.seq - 1}"
            )
        for activation in dict.fromkeys(a for a, _ in sites):
            _dim, width = _width(sizes, activation)
            orthonormal_basis(inputs.tensor(self.basis), width, name=self.basis)

    def values(self, hook_name: str, runs: Runs) -> torch.Tensor:
        """``h_src``: the donor's activation (at the source layer and position when given)."""
        if self.source_layer is not None:
            from patchspec.model.adapter import layout_of

            row = layout_of(hook_name)
            if row is None:
                raise InputError(f"Subspace.source_layer needs a known activation, got {hook_name!r}")
            act = runs.activation(self.donor, row.hook_name(self.source_layer))
        else:
            act = runs.activation(self.donor, hook_name)
        if self.source_pos is None:
            return act
        axis = runs.position_axes(hook_name)[0]
        return act.narrow(axis, self.source_pos, 1).expand_as(act)

    def combine(self, hook_name: str, runs: Runs) -> Combine:
        """``(h, h_src) -> h + s ((h_src - h) B) B^T``, ``B`` on the activation's device."""
        act = _receiving_device(self, hook_name, runs)

        def basis() -> torch.Tensor:
            q = orthonormal_basis(runs.tensor(self.basis), int(act.shape[-1]), name=self.basis)
            return _on(q.to(act.dtype if act.is_floating_point() else q.dtype), act)

        q = runs.memo(("subspace-basis", self.basis, hook_name), basis)
        strength = self.strength

        def combine(h: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
            b = q.to(h.dtype)
            return h + strength * (((source - h) @ b) @ b.T)

        return combine


@register_source
@attrs.frozen
class Add(Source):
    """Additive steering: ``h' = h + coef * d`` where patched (Turner et al. 2023).

    ``d`` is the run-time tensor named ``direction``, ``[width]`` (the activation's last dim),
    scaled to unit norm first when ``normalise=True``. Restrict the positions to steer with
    ``.sel(pos=...)`` (or sweep them); ``coef=0`` leaves the run unchanged.

    Args:
        direction: Key of the direction in ``run(..., tensors=...)``.
        coef: The coefficient; sweepable as an axis ``coef``.
        normalise: Use ``d / |d|``.
        receiver: The run that is steered (default ``"clean"``).

    Example:
        >>> Add("honesty", coef=4.0).label
        "add(direction='honesty', coef=4.0)"
    """

    kind: ClassVar[str] = "add"
    sweepable: ClassVar[tuple[str, ...]] = ("coef",)
    positionwise: ClassVar[bool] = True
    direction: str = attrs.field(validator=_key)
    coef: float = attrs.field(default=1.0, converter=_plain_number, validator=_number)
    normalise: bool = attrs.field(default=False, validator=_flag)
    receiver: Receiver = attrs.field(default="clean", validator=_donor)  # type: ignore[assignment]

    def needs(self) -> tuple[Receiver, ...]:
        """Only the receiving run."""
        return (self.receiver,)

    def tensor_keys(self) -> tuple[str, ...]:
        """The direction."""
        return (self.direction,)

    def _vector(self, value: Any, width: int) -> torch.Tensor:
        import torch

        d = _as_tensor(value, f"direction {self.direction!r}").to(torch.float64)
        if d.ndim == 2 and d.shape[0] == 1:
            d = d[0]
        if d.ndim != 1 or d.shape[0] != width:
            raise InputError(
                f"direction {self.direction!r} has shape {tuple(d.shape)}, but the activation's "
                f"last dim has {width} entries; give a vector [{width}]"
            )
        if not bool(torch.isfinite(d).all()):
            raise InputError(f"direction {self.direction!r} has non-finite entries")
        if self.normalise:
            norm = float(d.norm())
            if norm == 0:
                raise InputError(f"direction {self.direction!r} is zero and cannot be normalised")
            d = d / norm
        return d

    def check_sites(self, inputs: Inputs, sites: tuple[tuple[str, int], ...], sizes: Sizes) -> None:
        """The direction fits every patched activation."""
        for activation in dict.fromkeys(a for a, _ in sites):
            self._vector(inputs.tensor(self.direction), _width(sizes, activation)[1])

    def values(self, hook_name: str, runs: Runs) -> torch.Tensor:
        """The receiving run's activation (the write adds to the activation as it arrives)."""
        return runs.activation(self.receiver, hook_name)

    def combine(self, hook_name: str, runs: Runs) -> Combine:
        """``(h, _) -> h + coef * d``."""
        act = _receiving_device(self, hook_name, runs)
        d = runs.memo(
            ("add-direction", self.direction, self.normalise, hook_name),
            lambda: _on(self._vector(runs.tensor(self.direction), int(act.shape[-1])), act),
        )
        coef = self.coef

        def combine(h: torch.Tensor, _values: torch.Tensor) -> torch.Tensor:
            return h + coef * d.to(h.dtype)

        return combine


@register_source
@attrs.frozen
class SAELatent(Source):
    """Patch chosen SAE latents from the donor run, keeping the SAE's error term.

    ``x' = x + (z'_L - z_L) W_dec[L]``: ``z`` are the latents of the activation as it arrives,
    ``z'`` the donor's, ``L`` the patched latents. Everything the SAE does not reconstruct (its
    error ``x - x̂``) and every other latent stay the receiving run's, as SAELens's
    ``use_error_term=True``; ``latent=None`` patches nothing. The SAE is the run-time tensor
    named ``sae``: a dict ``{"W_enc", "W_dec", "b_enc", "b_dec"[, "threshold"]}`` or an SAE object
    with those attributes (``sae_lens.SAE``), whose input is the activation's last dim.

    Args:
        sae: Key of the SAE in ``run(..., tensors=...)``.
        latent: A latent index, a list of them, or ``None``; sweepable as an axis ``latent``.
        donor: The run ``z'`` comes from (``"clean"``: patch the corrupted run).

    Example:
        >>> SAELatent("sae", latent=[3, 7]).to_dict()
        {'kind': 'sae_latent', 'sae': 'sae', 'latent': [3, 7], 'donor': 'clean'}
    """

    kind: ClassVar[str] = "sae_latent"
    interchange: ClassVar[bool] = True
    sweepable: ClassVar[tuple[str, ...]] = ("latent",)
    positionwise: ClassVar[bool] = True
    sae: str = attrs.field(validator=_key)
    latent: int | tuple[int, ...] | None = attrs.field(default=None, converter=_latents, validator=_latent)
    donor: Receiver = attrs.field(default="clean", validator=_donor)

    @property
    def receiver(self) -> Receiver:
        """The run that is not the donor."""
        return _other(self.donor)

    @property
    def latents(self) -> tuple[int, ...]:
        """The patched latents."""
        if self.latent is None:
            return ()
        return self.latent if isinstance(self.latent, tuple) else (self.latent,)

    def needs(self) -> tuple[Receiver, ...]:
        """The donor run."""
        return (self.donor,)

    def to_dict(self) -> dict[str, Any]:
        """A plain dict (several latents as a list)."""
        out = super().to_dict()
        if isinstance(self.latent, tuple):
            out["latent"] = list(self.latent)
        return out

    def tensor_keys(self) -> tuple[str, ...]:
        """The SAE."""
        return (self.sae,)

    def check_sites(self, inputs: Inputs, sites: tuple[tuple[str, int], ...], sizes: Sizes) -> None:
        """The SAE reads the patched activation's width; every latent exists."""
        weights = sae_weights(inputs.tensor(self.sae), self.sae)
        for activation in dict.fromkeys(a for a, _ in sites):
            dim, width = _width(sizes, activation)
            if weights.d_in != width:
                raise InputError(
                    f"SAE {self.sae!r} reads {weights.d_in} features, but {activation!r} has "
                    f"{width} ({dim})"
                )
        bad = [i for i in self.latents if i >= weights.d_sae]
        if bad:
            raise InputError(
                f"SAELatent.latent={bad[0]} is outside SAE {self.sae!r}'s latents "
                f"0..{weights.d_sae - 1}"
            )

    def values(self, hook_name: str, runs: Runs) -> torch.Tensor:
        """The donor's activation (its latents are computed at the write)."""
        return runs.activation(self.donor, hook_name)

    def combine(self, hook_name: str, runs: Runs) -> Combine:
        """``(x, x_src) -> x + (z_L(x_src) - z_L(x)) W_dec[L]``."""
        import torch

        act = _receiving_device(self, hook_name, runs)
        weights = sae_weights(runs.tensor(self.sae), self.sae)
        moved = SAEWeights(
            **{k: _on(v, act) for k, v in weights.tensors().items()},
            apply_b_dec_to_input=weights.apply_b_dec_to_input,
        )
        latents = torch.tensor(self.latents, dtype=torch.long, device=act.device)
        w_dec = moved.W_dec[latents]

        def combine(x: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
            if latents.numel() == 0:
                return x
            delta = moved.encode(source, latents) - moved.encode(x, latents)
            return x + delta @ w_dec.to(x.dtype)

        return combine


# --- reading steering -------------------------------------------------------------------------
def _region_mask(region: Any, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """``shape`` booleans, True inside ``region`` (its selections as resolved on the prompt)."""
    import torch

    from patchspec.plan.cells import PerExample

    mask = torch.ones(shape, dtype=torch.bool, device=device)
    for axis, (_dim, selection) in enumerate(region.index, start=1):
        if selection is None:
            continue
        keep = torch.zeros(shape[axis], dtype=torch.bool, device=device)
        if isinstance(selection, PerExample):
            raise SpecError("steered generation takes integer positions, not named ones")
        keep[list(selection)] = True
        view = [1] * len(shape)
        view[axis] = shape[axis]
        mask &= keep.view(view)
    return mask


def steered_text(
    spec: Any,
    model: Any,
    prompts: str | list[str],
    *,
    tensors: Mapping[str, Any] | None = None,
    max_new_tokens: int = 5,
) -> Any:
    """Greedy continuations of a few prompts under every cell of a steering spec, labelled.

    Users judge steering by reading it: each prompt is run alone, ``max_new_tokens`` greedy steps,
    every step patched as the cell says (one full forward pass per step, no KV cache). Positions
    are those of the prompt; a position dim the spec leaves unrestricted covers the generated
    tokens too (ActAdd-style steering of every position).

    Args:
        spec: A :class:`~patchspec.PatchSpec` whose sources are :class:`Add` (e.g. sweeping ``coef``).
        model: A TransformerLens model in eval mode.
        prompts: A prompt or a few.
        tensors: The run-time tensors the spec names.
        max_new_tokens: Tokens generated per prompt.

    Returns:
        An ``xarray.DataArray`` of strings (the continuations), dims the spec's axes plus
        ``example`` (coordinates: the prompts), ``attrs["unsteered"]`` the continuations of the
        unpatched model. Attach it to a metric result with
        ``result.assign_coords(text=texts)`` when their dims match.

    Raises:
        SpecError: not a spec of ``Add`` sources, or a ``resid_mid`` spec.
        InputError: bad prompts or tensors, or a bad ``max_new_tokens``.
    """
    import numpy as np
    import torch
    import xarray as xr

    from patchspec.model.adapter import ModelAdapter
    from patchspec.model.session import Session
    from patchspec.plan.grid import compile
    from patchspec.spec import PatchSpec

    if not isinstance(spec, PatchSpec) or not all(isinstance(s, Add) for s in spec.sources):
        raise SpecError(
            f"steered_text reads steering: give a PatchSpec whose source is Add, got {spec!r}"
        )
    if spec.layout.writer != "direct":
        raise SpecError(f"steered_text cannot write {spec.activation!r}; steer resid_pre or resid_post")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    texts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not texts or not all(isinstance(t, str) for t in texts):
        raise InputError(f"steered_text takes a prompt or a list of prompts (strings), got {prompts!r}")
    adapter = ModelAdapter.of(model)
    adapter.check_eval_mode()
    out: Any = None
    unsteered: list[str] = []
    grid = None
    for b, text in enumerate(texts):
        session = Session(adapter, [text], [text], tensors=tensors)
        receiver = spec.receiver
        sizes = adapter.sizes(1, session.seq)
        grid = compile(spec, sizes)
        adapter.check_hooks(grid.sites)
        session.hook_names.update(grid.hook_names)
        for part in grid.parts:
            sites = tuple((part.spec.activation, layer) for layer in part.layers)
            for source in part.spec.sources:
                source.check_sites(session, sites, sizes)
        if out is None:
            out = np.empty((*grid.shape, len(texts)), dtype=object)
        start = session.tokens(receiver)

        def greedy(hooks: list[Any], start: torch.Tensor = start) -> str:
            tokens = start
            with torch.inference_mode():
                for _ in range(max_new_tokens):
                    logits = adapter.run_with_hooks(tokens, hooks)
                    tokens = torch.cat([tokens, logits[:, -1].argmax(-1, keepdim=True)], 1)
            return str(model.to_string(tokens[0, start.shape[1] :]))

        unsteered.append(greedy([]))
        for flat in range(grid.n_cells):
            hooks = []
            for region in grid.cell(flat).regions:
                combine = region.source.combine(region.hook_name, session)

                def write(act: torch.Tensor, hook: Any, region: Any = region, combine: Any = combine) -> torch.Tensor:
                    mask = _region_mask(region, tuple(act.shape), act.device)
                    return torch.where(mask, combine(act, act), act)

                hooks.append((region.hook_name, write))
            out[(*np.unravel_index(flat, grid.shape), b)] = greedy(hooks)
    if grid is None:  # unreachable: texts is not empty
        raise InputError("steered_text needs at least one prompt")
    coords = {d: list(grid.coords[d]) for d in grid.dims}
    return xr.DataArray(
        out,
        dims=(*grid.dims, "example"),
        coords={**coords, "example": texts},
        attrs={"unsteered": unsteered, "max_new_tokens": max_new_tokens},
        name="text",
    )


# --- keeping the tensors beside a result -----------------------------------------------------
def _plain_tensors(value: Any) -> Any:
    import torch

    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    weights = sae_weights(value)
    out: dict[str, Any] = {k: v.detach().cpu() for k, v in weights.tensors().items()}
    out["apply_b_dec_to_input"] = weights.apply_b_dec_to_input
    return out


def save_tensors(path: Any, tensors: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Write run-time tensors to one torch file beside a result (an SAE as a dict of tensors).

    Args:
        path: The file (conventionally ``<result>.tensors.pt``).
        tensors: What was passed as ``run(..., tensors=...)``.

    Returns:
        Each tensor's record, as results hold them in ``attrs["tensors"]``.

    Example:
        >>> import tempfile, torch
        >>> from pathlib import Path
        >>> path = Path(tempfile.mkdtemp()) / "result.tensors.pt"
        >>> records = save_tensors(path, {"B": torch.eye(3)})
        >>> read_tensors(path, expect=records)["B"].shape
        torch.Size([3, 3])
    """
    import torch

    plain = {str(k): _plain_tensors(v) for k, v in tensors.items()}
    torch.save(plain, path)
    return {k: tensor_record(v) for k, v in plain.items()}


def read_tensors(path: Any, *, expect: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Read tensors written by :func:`save_tensors`, checked against a result's records.

    Args:
        path: The file.
        expect: A result's ``attrs["tensors"]``: every key there must be in the file with the
            same SHA-256 (so the result can be reproduced with exactly these tensors).

    Raises:
        InputError: the file cannot be read, or a tensor is missing or differs from its record.
    """
    import torch

    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise InputError(f"tensors file {str(path)!r} cannot be read: {type(err).__name__}: {err}") from err
    if not isinstance(loaded, dict):
        raise InputError(f"tensors file {str(path)!r} holds a {type(loaded).__name__}, not a dict of tensors")
    for key, record in (expect or {}).items():
        if key not in loaded:
            raise InputError(f"tensors file {str(path)!r} has no tensor {key!r} (it has {', '.join(loaded) or 'none'})")
        got = tensor_record(loaded[key])["sha256"]
        if got != record.get("sha256"):
            raise InputError(
                f"tensor {key!r} in {str(path)!r} differs from the result's record (sha256 {got[:12]}... "
                f"against {str(record.get('sha256'))[:12]}...)"
            )
    return dict(loaded)
