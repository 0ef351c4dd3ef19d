"""Shards: shard i of N owns a fixed slice of every schedule, with no coordination at run time.

The idea of k6's execution segments, in its simplest form. Every shard computes the whole schedule the
same way (same scenario, same seed) and keeps its part of it:

- open executors: the global arrival sequence is generated identically everywhere, and shard i takes the
  arrivals whose global index n has ``n % N == i``; ``pre_allocated_vus`` and ``max_vus`` are split as
  evenly as whole VUs allow (``share``);
- closed executors: VU j belongs to shard ``j % N``, and keeps the class the unsharded run gives VU j;
  ``shared-iterations`` gives each VU its share of the budget and a shard the sum over its VUs (the
  shares add up to the total exactly); ``ramping-vus`` runs, at time t, the VUs j < target(t) it owns.

With N = 1 the one shard owns everything: an unsharded run.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_TEXT = re.compile(r"\s*(\d+)\s*/\s*(\d+)\s*")


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` (from 0) of ``count``."""

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ValueError(f"a shard is i/N with 0 <= i < N, got {self.index}/{self.count}")

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    @classmethod
    def parse(cls, text: str) -> Shard:
        """``"1/4"`` → ``Shard(1, 4)``.

        Raises:
            ValueError: not ``i/N`` with 0 <= i < N.
        """
        match = _TEXT.fullmatch(text)
        if match is None:
            raise ValueError(f"expected i/N (e.g. 0/4), got {text!r}")
        return cls(int(match[1]), int(match[2]))

    @property
    def whole(self) -> bool:
        return self.count == 1

    def owns(self, index: int) -> bool:
        """Whether the global VU or arrival ``index`` is this shard's."""
        return index % self.count == self.index

    def share(self, total: int) -> int:
        """This shard's whole part of ``total``: ⌈total/N⌉ for the first ``total % N`` shards, else ⌊total/N⌋."""
        return total // self.count + (1 if self.index < total % self.count else 0)

    def vus(self, total: int) -> range:
        """The global indices of the VUs this shard runs when the executor runs ``total`` VUs."""
        return range(self.index, total, self.count)

    def nth_vu(self, k: int) -> int:
        """The global index of this shard's ``k``-th VU (from 0)."""
        return self.index + k * self.count

    def shared_iterations(self, vus: int, iterations: int) -> int:
        """``shared-iterations``: the budget of this shard's VUs, their even shares of ``iterations`` added.

        VU j's share is ⌊iterations/vus⌋, plus one for the first ``iterations % vus`` VUs; a shard without
        VUs gets nothing, so no iteration is stranded where nothing can run it.
        """
        base, extra = divmod(iterations, vus)
        return sum(base + (1 if j < extra else 0) for j in self.vus(vus))
