"""How far plain log-space Sinkhorn is from doubly stochastic after a fixed number of iterations.

    python benchmarks/sinkhorn_convergence.py

Prints, per logit distribution, the share of 4x4 draws whose worst column-sum error exceeds 1e-5
and the worst error, without the exact rounding step (``exact=False``) and with it. These are the
numbers quoted in docs/method.md.
"""

from __future__ import annotations

import argparse

import torch

from crma_lightning.adapters.crma import sinkhorn


def column_errors(logits: torch.Tensor, iters: int, exact: bool) -> torch.Tensor:
    m = sinkhorn(logits, iters, exact=exact)  # (draws, n, n)
    return (m.sum(-2) - 1).abs().amax(-1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--draws", type=int, default=2000)
    parser.add_argument("--n", type=int, default=4)
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    shape = (args.draws, args.n, args.n)
    cases = {
        "N(0,1)": torch.randn(shape, generator=g),
        "N(0,2^2)": 2 * torch.randn(shape, generator=g),
        "random +/-50": 50.0 * (2 * torch.randint(0, 2, shape, generator=g) - 1).float(),
    }
    print(f"{args.draws} draws of {args.n}x{args.n} logits; column-sum error > 1e-5: share of draws, worst error")
    print("| logits | iterations | plain: share > 1e-5 | plain: worst | exact: worst |")
    print("|---|---|---|---|---|")
    for name, logits in cases.items():
        for iters in (20, 2000) if "50" in name else (20,):
            plain = column_errors(logits, iters, exact=False)
            exact = column_errors(logits, iters, exact=True)
            share = (plain > 1e-5).float().mean().item()
            print(f"| {name} | {iters} | {100 * share:.2f}% | {plain.max().item():.2e} | {exact.max().item():.2e} |")


if __name__ == "__main__":
    main()
