"""Task orders of the continual benchmark (``--orders K``): the given order first, then fixed others.

A forgetting number measured on one task order mixes the method with the order: the first domain is
the one that has the most stages to be forgotten over, and a domain that resembles its successor
suffers more. The continual-learning literature therefore reports the mean over a few orders (three
is the common choice, e.g. the Standard CL Benchmark of O-LoRA and its predecessors). The orders
here are fixed, not sampled, so that every run of the benchmark on the same domains uses the same
ones and the numbers stay comparable between commands:

1. the given order (``--domains``);
2. its reversal: the first domain becomes the last and the last the first, so every pair of
   domains meets in both directions;
3. the given order rotated left by ``T // 2``: a third first domain and a third last domain (for
   ``T >= 4`` every domain is first at most once and last at most once among orders 1-3);
4. then the remaining rotations of the given order (by 1, 2, ... positions), then the rotations of
   the reversal (by ``T // 2`` first, then 1, 2, ...), skipping any order met before.

That is the dihedral family of the given order: ``2 T`` distinct orders for ``T >= 3`` (2 for
``T = 2``); asking for more is an error rather than a silent repeat.
"""

from __future__ import annotations


def _rotations(order: list[str]) -> list[list[str]]:
    """``order`` rotated left by ``T // 2`` first, then by 1, 2, ..., T - 1 (without repeating ``T // 2``)."""
    t = len(order)
    shifts = [t // 2] + [s for s in range(1, t) if s != t // 2]
    return [order[s:] + order[:s] for s in shifts if 0 < s < t]


def candidate_orders(domains: list[str]) -> list[list[str]]:
    """Every order :func:`task_orders` can give for ``domains``, in the order it gives them (no repeats)."""
    given = list(domains)
    reverse = given[::-1]
    rotations = _rotations(given)
    ordered = [given, reverse, *rotations[:1], *rotations[1:], *_rotations(reverse)]
    out: list[list[str]] = []
    for order in ordered:
        if order not in out:
            out.append(order)
    return out


def task_orders(domains: list[str], k: int) -> list[list[str]]:
    """The first ``k`` task orders of ``domains``: the given order, its reversal, a half rotation, ...

    Args:
        domains: Domain names in the given training order (distinct).
        k: Number of orders, ``1 <= k <=`` the number of distinct orders available (see the module doc).

    Returns:
        ``k`` distinct permutations of ``domains``; the first is ``domains`` itself.

    Raises:
        ValueError: ``k < 1``, repeated domain names, or ``k`` larger than the number of distinct orders.
    """
    if len(set(domains)) != len(domains):
        raise ValueError(f"--orders needs distinct domains, got {list(domains)}")
    if k < 1:
        raise ValueError(f"--orders {k}: expected a number of task orders >= 1")
    candidates = candidate_orders(domains)
    if k > len(candidates):
        raise ValueError(
            f"--orders {k}: only {len(candidates)} distinct fixed orders exist for {len(domains)} domains "
            f"(the given order, its reversal and their rotations); expected --orders <= {len(candidates)}"
        )
    return candidates[:k]
