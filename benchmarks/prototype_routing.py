"""Perplexity vs prototype routing on a finished run: routing accuracy and cost per sequence, side by side.

Usage (a run with per-task adapters, e.g. configs/demo.yaml trained briefly):

    python benchmarks/prototype_routing.py --run RUN [--prefix_tokens 32] [--rows 64]

For the run's newest stage checkpoint, every held-out row of every trained domain is routed

* by perplexity: the first ``P`` tokens scored under each task adapter (``T`` prefix forwards), and
* by prototype routing, for every layer / pooling / estimator setting: one base forward over the same
  ``P`` tokens, statistics fitted on the domains' training rows (:mod:`crma_lightning.prototype`),

and the accuracy (share of rows routed to their own domain's adapter) is printed per domain and on
average, with the routing time per sequence of each (measured in the same process, same batches), and
the forwards per sequence of a routed answer (routing + 1 with the chosen adapter).
"""

from __future__ import annotations

import argparse
import itertools
import time

import torch

from crma_lightning.losses import row_token_losses
from crma_lightning.prototype import PrototypeRouter, adapters_off, local_task_sums, right_padded
from crma_lightning.run_dir import RunDirectory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True)
    parser.add_argument("--prefix_tokens", type=int, default=32)
    parser.add_argument("--rows", type=int, default=64, help="held-out rows per domain (at most)")
    parser.add_argument("--batch", type=int, default=16)
    opts = parser.parse_args()
    torch.set_num_threads(1)
    run = RunDirectory(opts.run)
    model, dm = run.build()
    dm.prepare(model.tokenizer)
    stage = run.stage_checkpoint(None)
    run.load(model, stage.path)
    model.eval()
    tasks = run.domains[: stage.stage]
    pad = model.tokenizer.pad_token_id or 0
    p = opts.prefix_tokens
    held = {d: [r[:p] for r in dm.eval_sets[d]["input_ids"][: opts.rows]] for d in tasks}
    print(f"run {opts.run}, stage {stage.stage}, tasks {tasks}, P = {p}, {sum(map(len, held.values()))} rows")

    def batches(rows):
        for i in range(0, len(rows), opts.batch):
            yield right_padded(rows[i : i + opts.batch], pad, model.device)

    # Perplexity routing: T prefix forwards.
    t0, ppl = time.perf_counter(), {}
    with torch.no_grad():
        for d, rows in held.items():
            choices = []
            for ids, mask in batches(rows):
                losses = []
                for t in tasks:
                    model.activate_task(t)
                    total, count = row_token_losses(model(ids, mask), ids.masked_fill(mask == 0, -100))
                    losses.append(total / count.clamp_min(1))
                choices += torch.stack(losses, dim=1).argmin(dim=1).tolist()
            ppl[d] = sum(tasks[c] == d for c in choices) / len(choices)
    n = sum(map(len, held.values()))
    ppl_ms = 1000 * (time.perf_counter() - t0) / n
    _line("perplexity", ppl, ppl_ms, len(tasks) + 1)

    settings = itertools.product((0, 1, -1), ("mean", "last", "mean_last"), ("mahalanobis", "nearest"))
    for layer, pooling, estimator in settings:
        router = PrototypeRouter(p, layer=layer, pooling=pooling, estimator=estimator)
        with torch.no_grad(), adapters_off(model.model, model.activate_task):
            for t in tasks:
                rows = dm.train_sets[t]["input_ids"]
                router.add_task(t, local_task_sums(router, model.model, rows, opts.batch, model.device, pad))
            t0, acc = time.perf_counter(), {}
            for d, rows in held.items():
                choices = []
                for ids, mask in batches(rows):
                    choices += router.distances(router.features(model.model, ids, mask)).argmin(dim=1).tolist()
                acc[d] = sum(tasks[c] == d for c in choices) / len(choices)
        _line(f"prototype layer={layer} {pooling} {estimator}", acc, 1000 * (time.perf_counter() - t0) / n, 2)


def _line(name: str, acc: dict[str, float], ms: float, forwards: int) -> None:
    per = ", ".join(f"{d} {a:.2f}" for d, a in acc.items())
    print(f"{name}: accuracy {sum(acc.values()) / len(acc):.3f} ({per}); {ms:.2f} ms/seq routing; {forwards} fwd/seq")


if __name__ == "__main__":
    main()
