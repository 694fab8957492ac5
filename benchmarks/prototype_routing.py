"""Perplexity vs prototype vs hybrid routing on a finished run: routing accuracy and cost per sequence.

Usage (a run with per-task adapters, e.g. a FROZEN run of ``benchmarks/continual.py``):

    python benchmarks/prototype_routing.py --run RUN [--prefix_tokens 32] [--rows 128]
    python benchmarks/prototype_routing.py --run RUN --dev [--prefix_tokens 32]   # the settings sweep

For the run's newest stage checkpoint, every held-out row of every trained domain (at most ``--rows``)
is routed

* by perplexity: the first ``P`` tokens scored under each task adapter (``T`` prefix forwards),
* by prototype routing with the library's defaults (:mod:`crma_lightning.routing.prototype`): one base forward
  over the same ``P`` tokens, statistics fitted on the domains' training rows, and
* by the hybrid: prototype, and perplexity for the rows whose margin is below ``--fallback_margin``,

and the accuracy (share of rows routed to their own domain's adapter) is printed per domain and on
average, with the routing time per sequence of each (measured in the same process, on the same batches)
and the forwards per routed sequence (routing + 1 with the chosen adapter).

``--dev`` chooses settings without the held-out rows: the statistics are fitted on the first 80 % of each
domain's training rows and every layer / pooling / shrinkage setting (and the hybrid's margins, against
perplexity routing on the same rows) is scored on the last 20 % - rows the adapters may have trained on,
which flatters perplexity routing, not the prototypes.
"""

from __future__ import annotations

import argparse
import time

import torch

from crma_lightning.cli.run_dir import RunDirectory
from crma_lightning.data.sampling import right_padded
from crma_lightning.losses import row_token_losses
from crma_lightning.routing.prototype import (
    HYBRID_MARGIN,
    PrototypeRouter,
    adapters_off,
    layer_indices,
    local_task_sums,
    margins,
    pool,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True)
    parser.add_argument("--prefix_tokens", type=int, default=32)
    parser.add_argument("--rows", type=int, default=128, help="held-out rows per domain (at most)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--fallback_margin", type=float, default=HYBRID_MARGIN)
    parser.add_argument("--dev", action="store_true", help="the settings sweep on training rows (see above)")
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
    if opts.dev:
        fit = {t: dm.train_sets[t].select(range(int(0.8 * len(dm.train_sets[t])))) for t in tasks}
        held = {t: _prefixes(dm.train_sets[t], range(int(0.8 * len(dm.train_sets[t])), len(dm.train_sets[t])), p)
                for t in tasks}  # fmt: skip
    else:
        fit = {t: dm.train_sets[t] for t in tasks}
        held = {t: _prefixes(dm.eval_sets[t], range(min(opts.rows, len(dm.eval_sets[t]))), p) for t in tasks}
    n = sum(map(len, held.values()))
    print(
        f"run {opts.run}, stage {stage.stage}, tasks {tasks}, P = {p}, {n} rows ({'dev' if opts.dev else 'held-out'})"
    )

    def batches(rows):
        for i in range(0, len(rows), opts.batch):
            yield right_padded(rows[i : i + opts.batch], pad, model.device)

    def prefix_losses(ids, mask):
        out = []
        for t in tasks:
            model.activate_task(t)
            total, count = row_token_losses(model(ids, mask), ids.masked_fill(mask == 0, -100))
            out.append(total / count.clamp_min(1))
        return torch.stack(out, dim=1)

    with torch.no_grad():
        t0, ppl = time.perf_counter(), {}
        for d, rows in held.items():
            ppl[d] = torch.cat([prefix_losses(ids, mask) for ids, mask in batches(rows)])
        ppl_ms = 1000 * (time.perf_counter() - t0) / n
        _line("perplexity", {d: _acc(s, tasks.index(d)) for d, s in ppl.items()}, ppl_ms, len(tasks) + 1)

        router = PrototypeRouter(p)
        with adapters_off(model.model, model.activate_task):
            t0 = time.perf_counter()
            for t in tasks:
                router.add_task(t, local_task_sums(router, model.model, fit[t], opts.batch, model.device, pad))
            fit_s = time.perf_counter() - t0
            t0, dist = time.perf_counter(), {}
            for d, rows in held.items():
                dist[d] = torch.cat([router.distances(router.features(model.model, i, m)) for i, m in batches(rows)])
            proto_ms = 1000 * (time.perf_counter() - t0) / n
        settings = router.settings()
        _line(f"prototype (defaults: layer {settings['layer']}, {settings['pooling']}, {settings['estimator']}, "
              f"shrinkage {settings['shrinkage']}; fit {fit_s:.1f} s)",
              {d: _acc(s, tasks.index(d)) for d, s in dist.items()}, proto_ms, 2)  # fmt: skip

        margins_to_try = (0.5, 1.0, 2.0, 3.0, 4.0) if opts.dev else (opts.fallback_margin,)
        for margin in margins_to_try:
            # Timed as served: the prototype pass above, plus prefix forwards of the fallback rows only.
            t0, acc, shares = time.perf_counter(), {}, []
            for d, rows in held.items():
                near = margins(dist[d]) < margin
                picked = [rows[i] for i in near.nonzero().flatten().tolist()]
                if picked:
                    torch.cat([prefix_losses(ids, mask) for ids, mask in batches(picked)])
                choice = torch.where(near, ppl[d].argmin(dim=1), dist[d].argmin(dim=1))
                acc[d], _ = (
                    float((choice == tasks.index(d)).double().mean()),
                    shares.append(float(near.double().mean())),
                )
            share = sum(shares) / len(shares)
            ms = proto_ms + 1000 * (time.perf_counter() - t0) / n
            _line(f"hybrid (margin {margin:g}; perplexity for {share:.3f} of rows)", acc, ms, 2 + share * len(tasks))
        if opts.dev:
            _sweep(model, tasks, fit, held, opts, pad)


def _sweep(model, tasks, fit, held, opts, pad) -> None:
    """Layer sets x poolings x shrinkages from one base forward per batch (the fitting rows, then the scored)."""
    p = opts.prefix_tokens
    layer_sets = {"-1": [-1], "0": [0], "last 3": [-3, -2, -1], "all": "all"}
    settings = [(name, pooling) for name in layer_sets for pooling in ("mean", "mean_last", "mean_std")]

    def features(rows_of):  # {task: rows} -> {(layer set, pooling): {task: (N, F) float64}}
        out = {s: {} for s in settings}
        for t, rows in rows_of.items():
            parts = {s: [] for s in settings}
            for i in range(0, len(rows), opts.batch):
                ids, mask = right_padded(rows[i : i + opts.batch], pad, model.device)
                with adapters_off(model.model, model.activate_task):
                    hidden = model.model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
                for name, pooling in settings:
                    chosen = [pool(hidden[j], mask, pooling) for j in layer_indices(layer_sets[name], len(hidden))]
                    parts[(name, pooling)].append(torch.cat(chosen, dim=1))
            for s in settings:
                out[s][t] = torch.cat(parts[s])
        return out

    train = features({t: _prefixes(fit[t], range(len(fit[t])), p) for t in tasks})
    scored = features(held)
    for name, pooling in settings:
        for shrinkage in (0.1, 0.01):
            router = PrototypeRouter(p, layer=layer_sets[name], pooling=pooling, shrinkage=shrinkage)
            for t in tasks:
                router.add_task(t, PrototypeRouter.row_sums(train[(name, pooling)][t]))
            acc = {d: _acc(router.distances(scored[(name, pooling)][d]), tasks.index(d)) for d in tasks}
            _line(f"sweep: layers {name}, {pooling}, shrinkage {shrinkage}", acc, None, 2)


def _prefixes(dataset, indices, p: int) -> list[list[int]]:
    rows = dataset[list(indices)]["input_ids"] if len(indices) else []
    return [list(r[:p]) for r in rows]


def _acc(scores: torch.Tensor, own: int) -> float:
    return float((scores.argmin(dim=1) == own).double().mean())


def _line(name: str, acc: dict[str, float], ms: float | None, forwards: float) -> None:
    per = ", ".join(f"{d} {a:.3f}" for d, a in acc.items())
    cost = "" if ms is None else f"; {ms:.2f} ms/seq routing; {forwards:.2f} fwd/seq"
    print(f"{name}: accuracy {sum(acc.values()) / len(acc):.3f} ({per}){cost}", flush=True)


if __name__ == "__main__":
    main()
