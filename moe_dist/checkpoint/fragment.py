"""What an engine hands the checkpoint: contiguous runs of flattened parameters, as live views.

Every sharding engine we use (ZeRO-1/2 flat partitions, ZeRO-3 even splits, FSDP2 row shards)
gives each rank one contiguous run ``[offset, offset + n)`` of a parameter flattened in row-major
order. The checkpoint stores the parameter in its own shape, so a run becomes the few boxes of
that shape it covers (:func:`flat_boxes`); each box is a zero-copy view of the run.

Legend: N numel of the parameter, n elements of this rank's run, S the parameter's shape.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class Box:
    """A block of the parameter: ``offsets``/``sizes`` per dimension, and the flat run
    ``[start, start + numel)`` it occupies (boxes from :func:`flat_boxes` are always contiguous)."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    start: int

    @property
    def numel(self) -> int:
        return math.prod(self.sizes)


def flat_boxes(shape: tuple[int, ...], start: int, n: int) -> list[Box]:
    """The flat run ``[start, start + n)`` of a row-major tensor of ``shape`` as non-empty boxes.

    At most ``2 * (ndim - 1) + 1``: a partial first row (split again one dimension down), a block
    of whole rows, a partial last row. A zero-size box is never returned (DCP reads one as an
    overlap). A 0-dim tensor is one box of no dimensions.
    """
    if n <= 0:
        return []
    if not shape:
        return [Box((), (), start)]
    out: list[Box] = []
    _split(tuple(shape), start, start + n, (), start, out)
    return out


def _split(shape: tuple[int, ...], lo: int, hi: int, prefix: tuple[int, ...], base: int, out: list[Box]) -> None:
    """Append the boxes of the run ``[lo, hi)`` (flat, relative to a sub-tensor of ``shape`` at
    index ``prefix``; ``base`` is the flat position of that run in the whole tensor)."""
    ones = (1,) * len(prefix)
    if len(shape) == 1:
        out.append(Box(prefix + (lo,), ones + (hi - lo,), base))
        return
    row = math.prod(shape[1:])              # elements in one index of dimension 0
    first, last = lo // row, (hi - 1) // row
    if first == last and (lo % row or hi % row):  # inside one row: go one dimension down
        _split(shape[1:], lo - first * row, hi - first * row, prefix + (first,), base, out)
        return
    full_lo = first if lo % row == 0 else first + 1
    full_hi = last + 1 if hi % row == 0 else last
    if lo % row:
        _split(shape[1:], lo % row, row, prefix + (first,), base, out)
    if full_hi > full_lo:
        out.append(Box(prefix + (full_lo,) + (0,) * (len(shape) - 1), ones + (full_hi - full_lo,) + shape[1:],
                       base + (full_lo * row - lo)))
    if hi % row:
        _split(shape[1:], 0, hi % row, prefix + (last,), base + (last * row - lo), out)


def box_view(run: torch.Tensor, box: Box, run_start: int) -> torch.Tensor:
    """The part of ``run`` (a flat [n] tensor starting at flat element ``run_start``) that ``box``
    covers, viewed in the box's shape (no copy)."""
    return run.narrow(0, box.start - run_start, box.numel).view(box.sizes)


def box_start(shape: tuple[int, ...], offsets: tuple[int, ...], sizes: tuple[int, ...]) -> int:
    """The flat start of a box, checking that the box is one contiguous run of ``shape``."""
    pos, seen_partial = 0, False
    for dim, (o, s, full) in enumerate(zip(offsets, sizes, shape)):
        if seen_partial and (o != 0 or s != full):
            raise ValueError(f"box offsets {list(offsets)} sizes {list(sizes)} of shape {list(shape)} is not "
                             "a contiguous run")
        seen_partial = seen_partial or s != 1
        pos = pos * full + o
    return pos


@dataclass
class Fragment:
    """This rank's elements ``[offset, offset + n)`` of one flattened parameter, as live views.

    ``states`` cover the same run as ``master``. ``whole_states`` hold a state this rank keeps for
    the *whole* parameter although it owns only a run (DeepSpeed's ZeRO-1/2 Muon momentum: the
    Newton-Schulz step needs the whole matrix); it is saved as the owned run only and loaded
    whole. ``owner`` is the optimizer's state dict where scalar states (``step``) live.
    ``aliases``: other names of the same parameter (a tied output head), saved under each name.
    """

    name: str
    shape: tuple[int, ...]         # S
    offset: int                    # first owned element inside the flattened param
    master: torch.Tensor           # [n] fp32 master weights
    states: dict[str, torch.Tensor] = field(default_factory=dict)        # key -> [n]
    whole_states: dict[str, torch.Tensor] = field(default_factory=dict)  # key -> [N]
    owner: dict = field(default_factory=dict)
    aliases: tuple[str, ...] = ()

    @property
    def n(self) -> int:
        return self.master.numel()

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def scalars(self) -> dict[str, Any]:
        """Non-tensor or 0-dim states of the optimizer entry this run belongs to (Adam's ``step``)."""
        return {k: v for k, v in self.owner.items() if is_scalar(v)}


def split_rows(fragments: list[Fragment], rows: dict[str, list[str]]) -> list[Fragment]:
    """Fragments of stacked parameters cut into one fragment per row of dimension 0, each under its
    own name: ``rows[name][j]`` names row ``j`` of parameter ``name`` (a stacked expert matrix
    ``(El, F, D)`` becomes ``El`` matrices ``(F, D)``). Other fragments pass through. The pieces are
    views of the same storage; a run that starts or ends inside a row gives that row a partial run.

    Legend: R row numel (the product of the dimensions after the first), j a row."""
    out: list[Fragment] = []
    for f in fragments:
        names = rows.get(f.name)
        if names is None:
            out.append(f)
            continue
        if len(names) != f.shape[0] or f.aliases:
            raise ValueError(f"{f.name}: {len(names)} row names for a stacked parameter of shape {f.shape}"
                             f"{' with aliases ' + str(f.aliases) if f.aliases else ''}")
        R = math.prod(f.shape[1:])
        for j in range(f.offset // R, -(-(f.offset + f.n) // R)):
            lo, hi = max(f.offset, j * R), min(f.offset + f.n, (j + 1) * R)

            def cut(t: torch.Tensor, lo: int = lo, hi: int = hi) -> torch.Tensor:
                return t.narrow(0, lo - f.offset, hi - lo)

            out.append(Fragment(names[j], tuple(f.shape[1:]), lo - j * R, cut(f.master),
                                states={k: cut(v) for k, v in f.states.items()},
                                whole_states={k: v.narrow(0, j * R, R) for k, v in f.whole_states.items()},
                                owner=f.owner))
    return out


def is_scalar(v: Any) -> bool:
    """A Python number (not a bool) or a 0-dim tensor: torch's Adam keeps ``step`` as the latter."""
    if torch.is_tensor(v):
        return v.dim() == 0
    return isinstance(v, (int, float)) and not isinstance(v, bool)
