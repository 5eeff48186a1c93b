"""Causal tracing (Meng et al. 2022, "Locating and Editing Factual Associations in GPT", ROME).

The subject's token embeddings are corrupted with Gaussian noise (3 x the standard deviation of
the embedding matrix by default), several noise samples at once: the prompt is repeated
``samples`` times in one batch and every copy draws its own noise, seeded. Then each state is
restored in turn to its clean value: the residual stream after block ``layer`` at ``pos``, and
the MLP and attention outputs of a *window* of ``window`` layers centred on ``layer`` (ROME's
``window=10``). The score is the probability of the answer token at the last position, averaged
over the noise samples.

It is one :class:`~patchspec.Sweep` of joint specs, run by the usual engines: a noise part
(:class:`~patchspec.sources.Gaussian` on ``resid_pre`` of block 0 at the subject positions, which is
the embedding plus the position embedding: adding noise there is adding it to the embedding) and a
restore part (:class:`~patchspec.sources.Clean`, written after the noise where they meet).

Example:
    >>> import patchspec as ps
    >>> from patchspec.tracing import causal_trace
    >>> model = ps.toy.toy_model()  # doctest: +SKIP
    >>> trace = causal_trace(model, tokens, answer=7, subject=[1, 2], samples=4)  # doctest: +SKIP
    >>> trace["mlp_out"].dims  # doctest: +SKIP
    ('layer', 'pos')
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
import xarray as xr
from jaxtyping import Int

from patchspec.errors import InputError, SpecError
from patchspec.sources import Clean, Gaussian
from patchspec.spec import JointSpec, PatchSpec, Sweep

if TYPE_CHECKING:
    from matplotlib.figure import Figure

#: The states ROME restores: hidden states (one layer), MLP and attention outputs (a window).
KINDS: tuple[str, ...] = ("resid_post", "mlp_out", "attn_out")


def window_layers(layer: int, window: int, n_layers: int) -> tuple[int, ...]:
    """The layers restored around ``layer``: ROME's ``range(layer - window // 2, layer - (-window // 2))``
    clipped to the model.

    Example:
        >>> window_layers(0, 10, 12), window_layers(6, 3, 12), window_layers(5, 1, 12)
        ((0, 1, 2, 3, 4), (5, 6, 7), (5,))
    """
    return tuple(range(max(0, layer - window // 2), min(n_layers, layer - (-window // 2))))


def _window_rule(window: int, n_layers: int) -> Callable[[Mapping[str, Any]], Mapping[str, Any]]:
    def rule(cell: Mapping[str, Any]) -> Mapping[str, Any]:
        return {"layer": window_layers(int(cell["layer"]), window, n_layers), "pos": cell["pos"]}

    rule.__qualname__ = f"window_layers(window={window})"
    return rule


def embedding_std(model: Any) -> float:
    """The standard deviation of the model's token embedding matrix ``W_E``."""
    w_e = getattr(model, "W_E", None)
    if w_e is None:
        w_e = model.embed.W_E
    return float(w_e.detach().float().std())


def trace_specs(
    subject: Sequence[int],
    *,
    n_layers: int,
    scale: float,
    seed: int = 0,
    window: int = 10,
    kinds: Sequence[str] = KINDS,
) -> tuple[PatchSpec, Sweep]:
    """The specs of a causal trace: the noise alone, and the sweep of noise & restore, one spec
    per kind (``resid_*`` restores one layer, the others ``window`` layers).

    Raises:
        SpecError: no subject position, a window below 1, or an unknown kind.

    Example:
        >>> noise, sweep = trace_specs([1, 2], n_layers=2, scale=0.3)
        >>> sweep.names
        ('resid_post', 'mlp_out', 'attn_out')
    """
    if not subject:
        raise SpecError("causal tracing needs at least one subject position to corrupt")
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise SpecError(f"window must be a positive int (layers restored together), got {window!r}")
    noise = PatchSpec(
        "resid_pre",
        axes=(),
        restrictions={"layer": 0, "pos": list(subject)},
        source=Gaussian(scale=scale, seed=seed, receiver="corrupted"),
        name="noise",
    )
    specs = []
    for kind in kinds:
        single = kind.startswith("resid") or window == 1
        restore = PatchSpec(
            kind,
            axes=("layer", "pos"),
            rule=None if single else _window_rule(window, n_layers),
            source=Clean(),
        )
        specs.append(JointSpec(parts=(noise, restore), name=kind))
    return noise, Sweep(*specs, name="causal_trace")


def _subject_positions(model: Any, tokens: torch.Tensor, subject: str | Sequence[int]) -> list[int]:
    if not isinstance(subject, str):
        positions = [int(p) for p in subject]
        bad = [p for p in positions if not 0 <= p < tokens.shape[-1]]
        if bad:
            raise InputError(
                f"subject position {bad[0]} is outside the prompt's {tokens.shape[-1]} tokens"
            )
        return positions
    ids = model.to_tokens(subject, prepend_bos=False)[0].tolist()
    row = tokens[0].tolist()
    for start in range(len(row) - len(ids) + 1):
        if row[start : start + len(ids)] == ids:
            return list(range(start, start + len(ids)))
    raise InputError(f"subject {subject!r} (tokens {ids}) does not occur in the prompt (tokens {row})")


def causal_trace(
    model: Any,
    prompt: str | Int[torch.Tensor, " pos"] | Int[torch.Tensor, "1 pos"],
    answer: int | str,
    subject: str | Sequence[int],
    *,
    samples: int = 10,
    noise: float = 3.0,
    seed: int = 0,
    window: int = 10,
    kinds: Sequence[str] = KINDS,
    engine: str | None = None,
) -> xr.Dataset:
    """ROME's causal trace of one prompt: every (layer, pos) state restored under subject noise.

    Args:
        model: A TransformerLens model (``TransformerBridge``) in eval mode.
        prompt: The prompt, as text or tokens ``[pos]`` / ``[1, pos]``.
        answer: The answer token (id, or text of one token).
        subject: The subject's token positions, or its text (found in the prompt's tokens).
        samples: Noise samples, run together in one batch.
        noise: Noise standard deviation in units of the embedding matrix's std.
        seed: Seed of the noise (the same seed gives the same trace).
        window: Layers restored together for MLP and attention outputs.
        kinds: Activations restored (default: ``resid_post``, ``mlp_out``, ``attn_out``).
        engine: ``"batched"`` (default) or ``"reference"``.

    Returns:
        A Dataset with one ``(layer, pos)`` variable per kind: the answer's probability with that
        state restored, averaged over the samples. ``attrs`` hold ``high_score`` (the clean
        run), ``low_score`` (noise, nothing restored), the subject positions and the settings.

    Raises:
        PatchSpecError: bad settings or inputs (before any forward pass).
    """
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise InputError(f"samples must be a positive int, got {samples!r}")
    if isinstance(prompt, str):
        tokens = model.to_tokens(prompt)
    else:
        tokens = torch.as_tensor(prompt).reshape(1, -1)
    if isinstance(answer, str):
        ids = model.to_tokens(answer, prepend_bos=False)[0].tolist()
        if len(ids) != 1:
            raise InputError(f"answer {answer!r} is {len(ids)} tokens ({ids}); give one token")
        answer = int(ids[0])
    target = int(answer)
    positions = _subject_positions(model, tokens, subject)
    scale = noise * embedding_std(model)
    noise_spec, sweep = trace_specs(
        positions, n_layers=model.cfg.n_layers, scale=scale, seed=seed, window=window, kinds=kinds
    )
    batch = tokens.repeat(samples, 1)

    def answer_probability(logits: torch.Tensor) -> torch.Tensor:
        return logits[:, -1].float().softmax(-1)[:, target].mean()

    low = noise_spec.run(model, batch, batch, answer_probability, engine=engine)
    result = sweep.run(model, batch, batch, answer_probability, engine=engine)
    result.attrs.update(
        high_score=float(result.attrs["clean_baseline"]),
        low_score=float(low.values),
        subject=positions,
        answer=target,
        samples=samples,
        noise=noise,
        noise_std=scale,
        seed=seed,
        window=window,
    )
    return result


def plot_trace(trace: xr.Dataset, *, titles: Mapping[str, str] | None = None) -> Figure:
    """The ROME-style three panels: tokens down, layers across, subject tokens starred.

    Args:
        trace: The result of :func:`causal_trace`.
        titles: Panel titles by kind (default: ROME's "single restored layer", "MLP", "Attn").
    """
    import matplotlib.pyplot as plt

    from patchspec.plot import tick_labels

    names = [str(n) for n in trace.data_vars]
    fig, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names), 0.35 * trace.sizes["pos"] + 1.8),
                             squeeze=False, constrained_layout=True)
    subject = set(trace.attrs.get("subject", ()))
    default = {
        "resid_post": "single restored layer",
        "mlp_out": f"restored MLP (window {trace.attrs.get('window')})",
        "attn_out": f"restored attention (window {trace.attrs.get('window')})",
    }
    cmaps = {"resid_post": "Purples", "mlp_out": "Greens", "attn_out": "Reds"}
    for ax, name in zip(axes[0], names, strict=True):
        data = trace[name].transpose("pos", "layer")
        low = trace.attrs.get("low_score")
        image = ax.pcolormesh(
            data["layer"].values, range(data.sizes["pos"]), data.values,
            shading="nearest", cmap=cmaps.get(name, "viridis"), vmin=low,
        )
        labels = [f"{t}*" if int(p) in subject else t for p, t in zip(data["pos"].values, tick_labels(data, "pos"), strict=True)]
        ax.set_yticks(range(data.sizes["pos"]), labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xticks(data["layer"].values)
        ax.set_xlabel("layer")
        ax.set_title((titles or {}).get(name, default.get(name, name)), fontsize=10)
        bar = fig.colorbar(image, ax=ax)
        bar.set_label(f"p(answer), low {low:.3g}" if low is not None else "p(answer)", fontsize=8)
    return fig
