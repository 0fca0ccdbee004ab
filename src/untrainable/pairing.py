"""Which guide layer pulls on which target layer, and how hard."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence, Union

from untrainable.capture import canonical_name


@dataclass(frozen=True)
class Pair:
    """One alignment term: target layer `target` is pulled toward guide layer `guide`."""

    target: str
    guide: str
    weight: float = 1.0

    def __post_init__(self) -> None:
        if not self.weight >= 0:
            raise ValueError(f"pair {self.target} <- {self.guide}: weight must be >= 0, got {self.weight}")

    @property
    def key(self) -> str:
        """The name under which the pair's similarity is logged."""
        return f"{self.target}<-{self.guide}"


PairSpec = Union[Pair, Sequence, Mapping]


def spread_index(i: int, n: int, m: int) -> int:
    """Target index of guide layer i of n when n guide layers spread over m target layers.

    round(i * (m - 1) / (n - 1)), halves rounded up, in exact integer
    arithmetic. A single guide layer goes to the first target layer.
    """
    if not 0 <= i < n or m < 1:
        raise ValueError(f"need 0 <= i < n and m >= 1, got i={i}, n={n}, m={m}")
    if n == 1:
        return 0
    return (2 * i * (m - 1) + (n - 1)) // (2 * (n - 1))


def spread_pairs(target_layers: Sequence[str], guide_layers: Sequence[str]) -> list[Pair]:
    """The paper's default pairing: guide layers spread evenly over the target's.

    Every guide layer gets one pair. With more guide layers than target layers
    several guide layers share a target layer and every one of those pairs
    counts; with fewer, some target layers are left unguided.
    """
    if not target_layers or not guide_layers:
        raise ValueError("spread_pairs needs at least one target layer and one guide layer")
    n, m = len(guide_layers), len(target_layers)
    return [Pair(target_layers[spread_index(i, n, m)], guide) for i, guide in enumerate(guide_layers)]


def make_pair(spec: PairSpec) -> Pair:
    """A Pair from a Pair, a (target, guide[, weight]) sequence, or a mapping with those keys.

    Layer names are exact module paths; DDP and torch.compile prefixes are stripped.
    """
    pair = _read_pair(spec)
    return Pair(canonical_name(pair.target), canonical_name(pair.guide), pair.weight)


def _read_pair(spec: PairSpec) -> Pair:
    if isinstance(spec, Pair):
        return spec
    if isinstance(spec, Mapping):
        unknown = set(spec) - {"target", "guide", "weight"}
        if unknown or not {"target", "guide"} <= set(spec):
            raise ValueError(f"a pair mapping needs keys target, guide and optionally weight; got {sorted(spec)}")
        return Pair(str(spec["target"]), str(spec["guide"]), float(spec.get("weight", 1.0)))
    if isinstance(spec, Sequence) and not isinstance(spec, str) and len(spec) in (2, 3):
        return Pair(str(spec[0]), str(spec[1]), float(spec[2]) if len(spec) == 3 else 1.0)
    raise ValueError(f"cannot read a pair from {spec!r}: use (target, guide) or (target, guide, weight)")


def check_pairs(pairs: Iterable[Pair], target_layers: Sequence[str], guide_layers: Sequence[str]) -> list[Pair]:
    """Validate that every pair names captured layers; list the valid ones if not."""
    pairs = list(pairs)
    if not pairs:
        raise ValueError("guidance needs at least one pair of layers")
    for pair in pairs:
        if pair.target not in target_layers:
            raise KeyError(f"pair {pair.key}: target layer {pair.target!r} is not one of {list(target_layers)}")
        if pair.guide not in guide_layers:
            raise KeyError(f"pair {pair.key}: guide layer {pair.guide!r} is not one of {list(guide_layers)}")
    keys = [pair.key for pair in pairs]
    duplicates = sorted({key for key in keys if keys.count(key) > 1})
    if duplicates:
        raise ValueError(f"pairs given twice: {duplicates}; use one pair with a weight instead")
    return pairs
