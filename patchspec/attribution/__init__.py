"""Attribution patching: first-order estimates of a whole grid from a few passes, and their
exact verification.

* :mod:`~patchspec.attribution.gradients`: one forward pass with autograd on, one backward per
  metric, gradients at every hook point a grid writes, for every example at once;
* :mod:`~patchspec.attribution.atp`: :class:`AtP`, attribution patching (Nanda 2023; Kramar et
  al. 2024) on the batched engine's masks;
* :mod:`~patchspec.attribution.qk`: :class:`AtPStar`, AtP with the QK fix for query, key and
  score cells (``estimator="atp*"``), rotary models included;
* :mod:`~patchspec.attribution.graddrop`: :class:`GradDrop`, AtP* with GradDrop
  (``estimator="graddrop"``): an unsigned ranking score, ``attrs["quantity"] = "score"``;
* :mod:`~patchspec.attribution.ig`: :class:`IntegratedGradients` along each hook point's path;
* :mod:`~patchspec.attribution.verify`: :func:`verify`, exact patching of an estimate's top
  cells and a random sample, with an upper confidence bound on what the estimate missed.

``spec.run(..., estimator="atp")`` (or ``"ig"`` with ``ig_steps=``) returns an estimate with the
dims, coordinates and attrs of the exact result, ``attrs["exact"] = False``
(``"graddrop"``: a score, not an estimate of the effect).
"""

from __future__ import annotations

from typing import Any

from patchspec.attribution.atp import AtP, contract
from patchspec.attribution.graddrop import GradDrop
from patchspec.attribution.ig import IntegratedGradients
from patchspec.attribution.qk import AtPStar
from patchspec.errors import OptionError, did_you_mean
from patchspec.execute.protocols import Estimator

#: The names ``estimator=`` takes: ``"exact"`` runs the exact engine ``engine=`` names.
ESTIMATOR_NAMES = ("exact", "atp", "atp*", "graddrop", "ig")


def check_estimator(value: Any) -> None:
    """Refuse an ``estimator=`` that is not a known name or an Estimator object.

    Raises:
        OptionError: naming the value and the valid names (with a did-you-mean).
    """
    if value is None or (isinstance(value, Estimator) and not isinstance(value, str)):
        return
    if isinstance(value, str):
        if value in ESTIMATOR_NAMES:
            return
        raise OptionError(
            f"unknown estimator {value!r}; valid estimators are {', '.join(ESTIMATOR_NAMES)} or "
            f"an Estimator object{did_you_mean(value, ESTIMATOR_NAMES)}"
        )
    raise OptionError(
        f"estimator must be a name ({', '.join(ESTIMATOR_NAMES)}) or an Estimator (with name, "
        f"exact, chunks() and estimate()), got {type(value).__name__}"
    )


def attribution_estimator(
    estimator: Any, *, ig_steps: int | None = None, max_memory: Any = None
) -> Estimator | None:
    """The estimator ``estimator=`` names (``None`` for ``"exact"``: the exact engine runs).

    Raises:
        OptionError: an unknown estimator, or ``ig_steps`` without ``estimator="ig"``.
    """
    check_estimator(estimator)
    if ig_steps is not None and estimator != "ig":
        raise OptionError(
            f"ig_steps={ig_steps!r} sets the steps of estimator='ig', but estimator is "
            f"{estimator!r}"
        )
    if estimator is None or estimator == "exact":
        return None
    if estimator == "atp":
        return AtP(max_memory=max_memory)
    if estimator == "atp*":
        return AtPStar(max_memory=max_memory)
    if estimator == "graddrop":
        return GradDrop(max_memory=max_memory)
    if estimator == "ig":
        return IntegratedGradients(
            ig_steps=8 if ig_steps is None else ig_steps, max_memory=max_memory
        )
    return estimator  # type: ignore[no-any-return]


def __getattr__(name: str) -> Any:
    if name == "verify":
        from patchspec.attribution.verify import verify

        return verify
    raise AttributeError(f"module 'patchspec.attribution' has no attribute {name!r}")


__all__ = [
    "ESTIMATOR_NAMES",
    "AtP",
    "AtPStar",
    "GradDrop",
    "IntegratedGradients",
    "attribution_estimator",
    "check_estimator",
    "contract",
    "verify",
]
