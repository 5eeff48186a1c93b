"""Named positions: one token index per prompt for names such as ``"S2"`` or ``"END"``.

The sweep's ``positions=`` table is resolved by :func:`resolve_positions` against the real
length of each prompt; a named selection of a position dim then differs per prompt
(:class:`~patchspec.plan.cells.PerExample`), and where a name sits at different indices in the
clean and corrupted runs the donor is read at its own index (:class:`Aligned`).
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, TypeAlias

import attrs

from patchspec.errors import InputError
from patchspec.sources import Receiver, Source

#: A user's table of named positions: ``{"S2": [3, 4], "END": -1}`` (one index per prompt, or
#: one for all) or a pandas DataFrame with one column per name and one row per prompt.
PositionTable: TypeAlias = Mapping[str, Any] | Any


@attrs.frozen(eq=False)
class Positions:
    """Named positions resolved to token indices of both (padded) runs.

    Attributes:
        names: The names, in the order the user gave them (the default sweep order).
        clean: ``name -> index per prompt`` into the clean run's tokens.
        corrupted: ``name -> index per prompt`` into the corrupted run's tokens.
        labels: ``name -> token label`` for results (the clean tokens at the name, distinct
            ones joined by ``|``); filled in by the sweep.
    """

    names: tuple[str, ...]
    clean: Mapping[str, tuple[int, ...]]
    corrupted: Mapping[str, tuple[int, ...]]
    labels: Mapping[str, str] = attrs.field(factory=dict)

    def of(self, run: Receiver) -> Mapping[str, tuple[int, ...]]:
        """The indices in one run."""
        return self.clean if run == "clean" else self.corrupted

    def moves(self, donor: Receiver, receiver: Receiver) -> tuple[tuple[tuple[int, int], ...], ...]:
        """Per prompt, ``(receiver index, donor index)`` of every name whose index differs."""
        into, out = self.of(receiver), self.of(donor)
        batch = len(next(iter(into.values())))
        return tuple(
            tuple(
                dict.fromkeys(
                    (into[n][b], out[n][b]) for n in self.names if into[n][b] != out[n][b]
                )
            )
            for b in range(batch)
        )


def _table(table: PositionTable, batch: int, what: str) -> dict[str, list[Any]]:
    """A user's position table as ``name -> one entry per prompt``."""
    if hasattr(table, "columns") and hasattr(table, "to_dict"):  # a pandas DataFrame
        table = {str(column): table[column].tolist() for column in table.columns}
    if not isinstance(table, Mapping):
        raise InputError(
            f"{what} must map each name to one index per prompt (a dict or a pandas DataFrame "
            f"with one column per name), got {type(table).__name__}"
        )
    out: dict[str, list[Any]] = {}
    for name, value in table.items():
        if not isinstance(name, str) or not name:
            raise InputError(f"{what}: position names must be non-empty strings, got {name!r}")
        if hasattr(value, "tolist"):
            value = value.tolist()
        if isinstance(value, int | numbers.Integral) and not isinstance(value, bool):
            value = [value] * batch
        if isinstance(value, str) or not isinstance(value, Sequence):
            raise InputError(
                f"{what}[{name!r}] must be an int or a list of one int per prompt, got {value!r}"
            )
        if len(value) != batch:
            raise InputError(
                f"{what}[{name!r}] has {len(value)} entries but there are {batch} prompts; "
                "give one index per prompt"
            )
        out[name] = list(value)
    if not out:
        raise InputError(f"{what} names no positions")
    return out


def _resolve_named(
    table: Mapping[str, list[Any]],
    lengths: Sequence[int],
    offsets: Sequence[int],
    what: str,
    run: str,
) -> dict[str, tuple[int, ...]]:
    resolved: dict[str, tuple[int, ...]] = {}
    for name, values in table.items():
        indices = []
        for b, value in enumerate(values):
            if isinstance(value, bool) or not isinstance(value, int | numbers.Integral):
                raise InputError(f"{what}[{name!r}][{b}] = {value!r} must be an int token index")
            n = lengths[b]
            if not -n <= int(value) < n:
                raise InputError(
                    f"{what}[{name!r}][{b}] = {value} is outside {run} prompt {b}, which has "
                    f"{n} tokens (valid: {-n}..{n - 1}, negative counting from its own end)"
                )
            indices.append(int(value) % n + offsets[b])
        resolved[name] = tuple(indices)
    return resolved


def resolve_positions(
    positions: PositionTable | tuple[PositionTable, PositionTable] | None,
    *,
    lengths: Mapping[Receiver, Sequence[int]],
    offsets: Mapping[Receiver, Sequence[int]] | None = None,
) -> Positions | None:
    """Resolve a user's named positions to token indices of both runs.

    An index counts tokens of each prompt on its own (as ``model.to_tokens(prompt)`` gives
    them, BOS included); a negative one counts from that prompt's own end, so ``"END": -1`` is
    each prompt's last real token. ``offsets`` (left padding) shift every index of a prompt.

    Args:
        positions: One table for both runs, or a pair ``(clean_table, corrupted_table)``.
        lengths: The real token count of each prompt of each run (see ``Session.lengths``).
        offsets: Leading pad tokens of each prompt of each run (default none: right padding).

    Returns:
        The resolved :class:`Positions`, or ``None`` when ``positions`` is ``None``.

    Raises:
        InputError: a table of the wrong size, a non-int index, an index outside its prompt,
            or clean and corrupted tables that name different positions.

    Example:
        >>> p = resolve_positions({"S2": [3, 4], "END": -1}, lengths={"clean": [6, 8], "corrupted": [6, 8]})
        >>> p.names, p.clean["END"]
        (('S2', 'END'), (5, 7))
    """
    if positions is None:
        return None
    runs: tuple[Receiver, Receiver] = ("clean", "corrupted")
    pair = isinstance(positions, tuple | list)
    if pair and len(positions) != 2:
        raise InputError(
            f"positions= is one table for both runs or a pair (clean, corrupted), got "
            f"{len(positions)} tables"
        )
    tables = positions if pair else (positions, positions)
    batch = len(lengths["corrupted"])
    parsed = {
        run: _table(table, batch, f"{run} positions" if pair else "positions")
        for run, table in zip(runs, tables, strict=True)
    }
    clean_names, corrupted_names = list(parsed["clean"]), list(parsed["corrupted"])
    if set(clean_names) != set(corrupted_names):
        only_clean = sorted(set(clean_names) - set(corrupted_names))
        only_corrupted = sorted(set(corrupted_names) - set(clean_names))
        raise InputError(
            "clean and corrupted positions must name the same positions; only in clean: "
            f"{only_clean}, only in corrupted: {only_corrupted}"
        )
    zero = {run: [0] * batch for run in runs}
    shift = {**zero, **dict(offsets or {})}
    resolved = {
        run: _resolve_named(
            parsed[run], lengths[run], shift[run], f"{run} positions" if pair else "positions", run
        )
        for run in runs
    }
    out = Positions(tuple(clean_names), resolved["clean"], resolved["corrupted"])
    pairs: tuple[tuple[Receiver, Receiver], ...] = (("clean", "corrupted"), ("corrupted", "clean"))
    for donor, receiver in pairs:
        for b, moves in enumerate(out.moves(donor, receiver)):
            targets = [r for r, _ in moves]
            if len(set(targets)) != len(targets):
                raise InputError(
                    f"prompt {b}: two names sit at the same {receiver} index but at different "
                    f"{donor} indices ({list(moves)}); names at one token must match in both runs"
                )
    return out


@attrs.frozen
class Aligned(Source):
    """A donor source read at each named position's *donor* index (internal).

    When a named position sits at different token indices in the clean and corrupted runs,
    the receiving run's index of a name gets the donor's activation at the donor's index of the
    same name; every other index reads the donor at the same index.
    """

    kind: ClassVar[str] = "aligned"
    inner: Source
    axes: tuple[int, ...]
    moves: tuple[tuple[tuple[int, int], ...], ...]

    @property
    def receiver(self) -> Receiver:
        """The inner source's receiver."""
        return self.inner.receiver

    @property
    def label(self) -> str:
        """The inner source's label."""
        return self.inner.label

    @property
    def interchange(self) -> bool:  # type: ignore[override]
        """The inner source's (values from the other run win where writes overlap)."""
        return self.inner.interchange

    def combine(self, hook_name: str, runs: Any) -> Any:
        """The inner source's write (a function of the receiving activation, or ``None``)."""
        return self.inner.combine(hook_name, runs)

    def values(self, hook_name: str, runs: Any) -> Any:
        """The inner values, gathered along the position axes."""
        import torch

        values = self.inner.values(hook_name, runs)

        def compute() -> torch.Tensor:
            batch = values.shape[0]
            seq = values.shape[self.axes[0]]
            index = torch.arange(seq).repeat(batch, 1)
            for b, moves in enumerate(self.moves):
                for target, origin in moves:
                    index[b, target] = origin
            out = values
            for axis in self.axes:
                view = [batch] + [1] * (values.ndim - 1)
                view[axis] = seq
                gather = index.to(values.device).view(view).expand(out.shape)
                out = torch.gather(out, axis, gather)
            return out

        return runs.memo((self, hook_name), compute)


