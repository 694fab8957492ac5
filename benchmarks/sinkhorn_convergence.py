"""How far plain log-space Sinkhorn is from doubly stochastic after a fixed number of iterations.

    python benchmarks/sinkhorn_convergence.py
    python benchmarks/sinkhorn_convergence.py --backward     # + cost and gradient of the two backward schemes

Prints, per logit distribution, the share of 4x4 draws whose worst column-sum error exceeds 1e-5
and the worst error, without the exact rounding step (``exact=False``) and with it. These are the
numbers quoted in docs/method.md. ``--backward`` adds, per scheme (v1: 20 iterations, back-propagation
through each; v2: 5 iterations + 3 Newton steps, implicit gradient), the CPU time of one forward + backward
of a single ``n × n`` Sinkhorn (what each CRMA block pays per step), the marginal error left before the
rounding step, and how far the gradient is from the gradient of the Sinkhorn limit.
"""

from __future__ import annotations

import argparse
import time

import torch

from crma_lightning.adapters.sinkhorn import sinkhorn


def column_errors(logits: torch.Tensor, iters: int, exact: bool) -> torch.Tensor:
    m = sinkhorn(logits, iters, exact=exact)  # (draws, n, n)
    return (m.sum(-2) - 1).abs().amax(-1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--draws", type=int, default=2000)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--backward", action="store_true", help="also time and compare the backward schemes")
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
    if args.backward:
        backward_report(args.n)


SCHEMES = {  # label: sinkhorn() keyword arguments
    "v1: 20 iterations, unrolled backward": {"n_iters": 20, "implicit": False},
    "v2 default: 5 iterations + 3 Newton, implicit backward": {"n_iters": 5, "newton_steps": 3, "implicit": True},
    "20 iterations, implicit backward": {"n_iters": 20, "implicit": True},
}


def time_forward_backward(logits: torch.Tensor, scheme: dict, repeats: int = 30) -> float:
    """Microseconds of thread CPU time (robust to other load) per forward + backward of ``sinkhorn`` (best of 10)."""
    logits = logits.clone().requires_grad_(True)
    probe = torch.randn_like(logits)
    best = float("inf")
    for _ in range(10):
        start = time.thread_time()
        for _ in range(repeats):
            logits.grad = None
            (sinkhorn(logits, **scheme) * probe).sum().backward()
        best = min(best, (time.thread_time() - start) / repeats * 1e6)
    return best


def gradient_gap_to_limit(logits: torch.Tensor, scheme: dict) -> torch.Tensor:
    """Per draw: ``||grad - grad_limit|| / ||grad_limit||`` for a random functional of M (no rounding, float64).

    The limit: 3000 unrolled iterations.
    """
    probe = torch.randn_like(logits, dtype=torch.float64)
    grads = []
    for kwargs in (scheme, {"n_iters": 3000, "implicit": False}):
        x = logits.double().requires_grad_(True)
        (sinkhorn(x, exact=False, **kwargs) * probe).sum().backward()
        grads.append(x.grad)
    return (grads[0] - grads[1]).flatten(1).norm(dim=1) / grads[1].flatten(1).norm(dim=1).clamp_min(1e-30)


def backward_report(n: int) -> None:
    g = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    print(f"\nScaling + backward schemes, {n}x{n}, {torch.get_num_threads()} threads:")
    one = torch.eye(n) * 4 + 0.5 * torch.randn(n, n, generator=g)
    cases = {
        "4I + N(0,0.5^2) (near the init)": torch.eye(n) * 4 + 0.5 * torch.randn(500, n, n, generator=g),
        "N(0,1)": torch.randn(500, n, n, generator=g),
        "N(0,3^2)": 3 * torch.randn(500, n, n, generator=g),
    }
    print(
        "| scheme | f+b us (CPU) | logits | error before rounding: median / max | gradient gap to limit: median / p90 |"
    )
    print("|---|---|---|---|---|")
    for label, scheme in SCHEMES.items():
        cost = time_forward_backward(one, scheme)
        for name, logits in cases.items():
            m = sinkhorn(logits, exact=False, **scheme)
            err = torch.maximum((m.sum(-1) - 1).abs().amax(-1), (m.sum(-2) - 1).abs().amax(-1))
            gap = gradient_gap_to_limit(logits, scheme)
            print(
                f"| {label} | {cost:.0f} | {name} | {err.median():.1e} / {err.max():.1e} | "
                f"{gap.median():.1e} / {gap.quantile(0.9):.1e} |"
            )


if __name__ == "__main__":
    main()
