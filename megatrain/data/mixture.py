"""The blended sample order of several sources: a pure function of (each source's
fingerprint and sample length, weights, seed, global sample index).

Weights are shares of training *bytes*: source s gets a share of the *samples*
p_s ~ weight_s / sample_bytes_s (normalised), so that its share of the bytes is its
weight. Global sample i draws from the source whose interval of [0, 1) (the cumulative
shares, in order) holds x_i = frac(vdc(i) + u): vdc is the base-2 van der Corput
sequence and u a shift keyed by the mixture and seed. The first n samples then give
each source n * p_s of them, give or take O(log n), at any n; and how many of the
first n went to source s has a closed form (`taken`): the indices [m, m + 2^k) with m
a multiple of 2^k are a regular grid of 2^k points, so a count is 64 grid counts at
most. Any global index therefore maps to (source, the source's own sample index)
without replaying the ones before it: resuming at any index, and at any data-parallel
size, needs nothing but the index.

A source's sample index k is position k mod N of its epoch k // N (N: its samples per
epoch) in its own single-source order (`megatrain.data.order`): a source that runs out
starts its next epoch, in a new shuffle, while the others go on; a small source with a
large weight is so up-sampled. All arithmetic is on 64-bit fixed-point integers: exact
and the same on every machine.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Sequence

from megatrain.data.format import FormatError, Manifest
from megatrain.data.order import derive_key

ONE = 1 << 64  # 1.0 in the 64-bit fixed point of the sequence


@dataclass(frozen=True)
class Source:
    """One source of a mixture as its order needs it (its path only to read it)."""

    name: str
    path: str
    weight: float
    fingerprint: str

    def record(self) -> dict:
        """What a checkpoint keeps of it: enough to tell whether a resumed run blends the same data."""
        return {"name": self.name, "fingerprint": self.fingerprint, "weight": self.weight}


def open_sources(specs: Sequence[tuple[str, str, float]]) -> list[Source]:
    """Sources of (name, path, weight) specs; ValueError naming the first bad one
    (a missing directory or manifest, a weight <= 0, a name or a dataset given twice)."""
    if not specs:
        raise ValueError("no data sources")
    sources: list[Source] = []
    for name, path, weight in specs:
        what = f"data source {name!r} ({path})"
        if not weight > 0:
            raise ValueError(f"{what}: weight must be positive, got {weight}")
        if not Path(path).is_dir():
            raise ValueError(f"{what}: no such directory")
        try:
            fingerprint = Manifest.load(path).fingerprint
        except FormatError as e:
            raise ValueError(f"{what}: {e}") from None
        for other in sources:
            if other.name == name:
                raise ValueError(f"{what}: the name {name!r} is given twice (also for {other.path})")
            if other.fingerprint == fingerprint:
                raise ValueError(f"{what}: the same dataset (fingerprint {fingerprint}) as source "
                                 f"{other.name!r} ({other.path})")
        sources.append(Source(name, str(path), float(weight), fingerprint))
    return sources


def vdc64(i: int) -> int:
    """The van der Corput radical inverse of i in base 2, as a 64-bit fixed-point fraction."""
    return int(f"{i:064b}"[::-1], 2)


def _grid_below(limit: int, offset: int, step: int, points: int) -> int:
    """How many of the points offset + t * step (mod ONE), t < points (step * points = ONE),
    lie in [0, limit)."""
    low = offset % step  # the grid's smallest point
    return 0 if limit <= low else min(points, (limit - low + step - 1) // step)


class Mixture:
    """Global sample index -> (source, that source's sample index); see the module docstring."""

    def __init__(self, fingerprints: Sequence[str], weights: Sequence[float], sample_bytes: Sequence[int], seed: int):
        if not len(fingerprints) == len(weights) == len(sample_bytes) > 0:
            raise ValueError("a mixture needs a fingerprint, weight and sample length per source")
        rates = [Fraction(w) / b for w, b in zip(weights, sample_bytes)]
        total = sum(rates)
        self.sample_shares = [float(r / total) for r in rates]
        cumulative = [Fraction(0)]
        for r in rates:
            cumulative.append(cumulative[-1] + r / total)
        # bounds[s]..bounds[s + 1]: source s's interval of [0, ONE)
        self.bounds = [int(c * ONE) for c in cumulative]
        # keyed by the shares, not the raw weights: weights 8 and 2 blend exactly as 0.8 and 0.2
        self.shift = derive_key("mixture", tuple(fingerprints), tuple(self.bounds), seed) % ONE

    def point(self, index: int) -> int:
        return (vdc64(index) + self.shift) % ONE

    def source_of(self, index: int) -> int:
        x = self.point(index)
        return next(s for s in range(len(self.bounds) - 1) if x < self.bounds[s + 1])

    def taken(self, n: int) -> list[int]:
        """How many of the global indices [0, n) each source draws: exact, without iterating over them."""
        below = [0] * len(self.bounds)  # indices whose point is below each bound
        start = 0
        for k in reversed(range(n.bit_length())):
            if n >> k & 1:  # the block [start, start + 2^k): a grid of 2^k points, ONE >> k apart
                offset = (vdc64(start) + self.shift) % ONE
                for s, bound in enumerate(self.bounds):
                    below[s] += _grid_below(bound, offset, ONE >> k, 1 << k)
                start += 1 << k
        return [hi - lo for lo, hi in zip(below, below[1:])]

    def assign(self, start: int, stop: int) -> list[tuple[int, int]]:
        """(source, the source's sample index) of each global index in [start, stop)."""
        counts = self.taken(start)
        out = []
        for index in range(start, stop):
            s = self.source_of(index)
            out.append((s, counts[s]))
            counts[s] += 1
        return out


def mixture_change(saved: Sequence[dict], now: Sequence[dict]) -> str | None:
    """What differs between a checkpoint's mixture records and this run's (None: the same blend)."""
    if len(saved) == len(now) == 1:  # one plain source: only its data matters, not its name
        return None if saved[0]["fingerprint"] == now[0]["fingerprint"] else (
            f"dataset {saved[0]['fingerprint']!r} in the checkpoint, {now[0]['fingerprint']!r} now")
    old, new = _by_name(saved), _by_name(now)
    differ = [f"source {n!r} only in the checkpoint" for n in old if n not in new]
    differ += [f"source {n!r} is new" for n in new if n not in old]
    for name in old.keys() & new.keys():
        a, b = old[name], new[name]
        if a["fingerprint"] != b["fingerprint"]:
            differ.append(f"source {name!r} is dataset {a['fingerprint']!r} in the checkpoint, {b['fingerprint']!r} now")
        if abs(a["share"] - b["share"]) > 1e-12:
            differ.append(f"source {name!r} has weight {a['weight']:g} of {a['total']:g} in the checkpoint, "
                          f"{b['weight']:g} of {b['total']:g} now")
    if not differ and [s["name"] for s in saved] != [s["name"] for s in now]:
        differ.append(f"sources in another order ({', '.join(old)} in the checkpoint, {', '.join(new)} now)")
    return "; ".join(sorted(differ)) or None


def _by_name(records: Sequence[dict]) -> dict[str, dict]:
    total = sum(r["weight"] for r in records)
    return {r["name"]: {**r, "share": r["weight"] / total, "total": total} for r in records}
