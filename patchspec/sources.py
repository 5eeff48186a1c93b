"""Where patched values come from.

A source is a small frozen value stored in a :class:`~patchspec.PatchSpec`. It names the run
that receives the patch (``receiver``) and produces the values written into it.

* :class:`Clean` — *denoising*: the clean run's activation is written into the corrupted run
  (the classic activation patching of Meng et al. 2022, "Locating and Editing Factual
  Associations in GPT", and Wang et al. 2022, "Interpretability in the Wild").
* :class:`Corrupted` — *noising*: the corrupted run's activation is written into the clean run.

Sources import no torch at module level, so specs stay light; values are computed lazily.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol

import attrs

from patchspec.errors import SpecError, did_you_mean

if TYPE_CHECKING:
    import torch

Receiver = Literal["clean", "corrupted"]


class Runs(Protocol):
    """What a source may read: the cached activations of both runs."""

    def clean(self, hook_name: str) -> torch.Tensor: ...

    def corrupted(self, hook_name: str) -> torch.Tensor: ...


@attrs.frozen
class Source:
    """Base class of value sources; subclasses set ``kind`` and implement :meth:`values`."""

    kind: ClassVar[str] = "source"
    receiver: ClassVar[Receiver] = "corrupted"

    def values(self, hook_name: str, runs: Runs) -> torch.Tensor:
        """The full activation tensor to take patched values from."""
        raise NotImplementedError

    def needs(self) -> tuple[Receiver, ...]:
        """Which runs' caches :meth:`values` reads."""
        return ("clean",)

    def to_dict(self) -> dict[str, Any]:
        """A plain dict that :func:`source_from_dict` turns back into this source."""
        return {"kind": self.kind, **attrs.asdict(self)}


@attrs.frozen
class Clean(Source):
    """Denoising: write the clean run's activation into the corrupted run (the default)."""

    kind: ClassVar[str] = "clean"
    receiver: ClassVar[Receiver] = "corrupted"

    def values(self, hook_name: str, runs: Runs) -> torch.Tensor:
        """The clean run's activation."""
        return runs.clean(hook_name)


@attrs.frozen
class Corrupted(Source):
    """Noising: write the corrupted run's activation into the clean run."""

    kind: ClassVar[str] = "corrupted"
    receiver: ClassVar[Receiver] = "clean"

    def values(self, hook_name: str, runs: Runs) -> torch.Tensor:
        """The corrupted run's activation."""
        return runs.corrupted(hook_name)

    def needs(self) -> tuple[Receiver, ...]:
        """Noising reads the corrupted cache."""
        return ("corrupted",)


SOURCES: dict[str, type[Source]] = {"clean": Clean, "corrupted": Corrupted}


def register_source(cls: type[Source]) -> type[Source]:
    """Class decorator making a :class:`Source` subclass loadable by :func:`source_from_dict`."""
    SOURCES[cls.kind] = cls
    return cls


def source_from_dict(data: Mapping[str, Any]) -> Source:
    """Rebuild a source from :meth:`Source.to_dict` output.

    Raises:
        SpecError: the ``kind`` is unknown.
    """
    fields = dict(data)
    kind = fields.pop("kind", None)
    if kind not in SOURCES:
        raise SpecError(
            f"unknown source kind {kind!r}; valid kinds are {', '.join(SOURCES)}"
            f"{did_you_mean(str(kind), SOURCES)}"
        )
    return SOURCES[kind](**fields)
