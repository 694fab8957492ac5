"""The benchmark's Markdown: one table of the settings (with routing and method cost), then pairs and targets."""

from __future__ import annotations

import math
from typing import Any

from .results import LORA_PAIRS, Null


def _f(x: Any, spec: str) -> str:
    if isinstance(x, Null) or x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "—"
    return format(x, spec)


def _ms(s: dict[str, Any], spec: str, with_range: bool = False) -> str:
    """``mean ± std`` (``[min, max]`` when asked) of an aggregate entry."""
    if s["n"] == 0:
        return "—"
    text = _f(s["mean"], spec)
    if not isinstance(s["std"], Null):
        text += f" ± {format(s['std'], spec.lstrip('+'))}"
    if with_range:
        text += f" [{_f(s['min'], spec)}, {_f(s['max'], spec)}]"
    return text


def _what(cfg: dict[str, Any]) -> str:
    """``lora, shared`` / ``crma (mix, g_max 0.5), per_task`` / ``lora, shared + replay``."""
    adapter = cfg["adapter"]
    crma = cfg.get("crma")
    if crma:
        norm = "" if crma["form"] == "mix" else f" {crma['norm']}"
        adapter += f" ({crma['form']}{norm}, g_max {crma['g_max']:g})"
    method = cfg.get("method")
    extra = f" + {method['name']}" if isinstance(method, dict) else ""
    joint = " (joint: every stage on the union)" if cfg.get("data") else ""
    return f"{adapter}, {cfg['task_adapters']}{extra}{joint}"


def _bytes(s: dict[str, Any]) -> str:
    if s["n"] == 0 or isinstance(s["mean"], Null):
        return "—"
    value = s["mean"]
    return "0" if value == 0 else f"{value / 1e6:.2f} MB" if value >= 1e5 else f"{value / 1e3:.1f} kB"


def _base_line(base: dict[str, Any]) -> str:
    """The base's ``L[0]`` per domain (mean over seeds and settings, with the spread between them)."""
    if not base:
        return "Base L[0]: not evaluated."
    parts = [f"{d} {_f(s['mean'], '.4f')}" if s["n"] else f"{d} —" for d, s in base.items()]
    spread = max((s["max"] - s["min"] for s in base.values() if s["n"]), default=0.0)
    return (
        f"Base L[0] (held-out loss of the base before any stage, per domain): {', '.join(parts)} "
        f"(largest spread over seeds and settings: {spread:.2g})."
    )


MERGED_DRIFT_NOTE = (
    "[1] MERGED's drift is against its own diagonal (the merge of the adapters trained by stage j, on domain j) "
    "over all positions; a routed drift (FROZEN, MODULAR) is against the oracle diagonal at positions >= P. "
    "Different references and targets: compare MERGED with the others on the final-row losses, not on drift."
)
"""Footnote of every table with a MERGED setting (also benchmarks/routing_table.py)."""


def render(results: dict[str, Any], agg: dict[str, Any], verdict: dict[str, Any]) -> str:
    """``results.md``: setup line, the table, the pair definitions and the targets."""
    setup = results["setup"]
    refs: dict[str, list[str]] = {}
    for x, ref in LORA_PAIRS.items():
        if x in agg["modes"]:
            refs.setdefault(ref, []).append(x)
    lines = [
        f"Domains (training order): {', '.join(setup['domains'])}. Base: {setup['base_model']['description']}. "
        f"{setup['steps']} steps/stage, batch {setup['batch_size']} x {setup['max_length']} tokens, "
        f"LoRA r={setup['lora_r']} on {setup['lora_targets']}, AdamW lr {setup['lr']}; seeds {setup['seeds']}; "
        f"{setup['machine']}; step interleaving: {setup['interleave']}; wall {results['wall_s'] / 60:.1f} min.",
        "",
        _base_line(agg.get("base_loss") or {}),
        "",
        "| setting | adapter, task adapters (+ method) | mean drift % oracle (mean ± std [min, max]) "
        "| mean drift % routed | routing accuracy | base-rel. forgetting % | plasticity (mean L[j][j]) "
        "| final held-out gain vs LoRA pair % | grad-norm var (stage mean) | stability gain vs LoRA pair "
        "| median step ms | step time vs LoRA pair | method state |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for mode, row in agg["modes"].items():
        cfg = setup["modes"][mode]
        pair = agg["pairs"].get(f"{mode}_vs_{LORA_PAIRS.get(mode)}")
        if pair is not None:
            gain, heldout, over = (
                _ms(pair["stability_gain"], "+.3f"),
                _ms(pair["heldout_improvement_pct"], "+.3f"),
                _ms(pair["overhead"], ".3f"),
            )
        elif mode in refs:
            gain = heldout = over = f"(LoRA ref. of {', '.join(refs[mode])})"
        else:
            gain = heldout = over = "—"
        routing = cfg["routing"]["mode"]
        if routing in ("perplexity", "prototype"):
            routed = _ms(row["drift_mean_routed_pct"], "+.3f")
            acc = _ms(row["routing_accuracy_mean"], ".3f")
        elif routing == "none":
            routed, acc = "= oracle (no routing needed)", "n/a"
        elif routing == "merged":
            routed, acc = "= oracle (one merged adapter) [1]", "n/a"
        else:
            routed = acc = "not run"
        lines.append(
            f"| {mode} | {_what(cfg)} | {_ms(row['drift_mean_pct'], '+.3f', True)} | {routed} | {acc} "
            f"| {_ms(row['base_relative_forgetting_mean_pct'], '+.2f')} | {_ms(row['plasticity_mean'], '.4f')} "
            f"| {heldout} | {_ms(row['grad_var'], '.3g')} | {gain} "
            f"| {_ms(row['step_median_ms'], '.1f')} | {over} | {_bytes(row['method_state_bytes'])} |"
        )
    if any(setup["modes"][m]["routing"]["mode"] == "merged" for m in agg["modes"]):
        lines += ["", MERGED_DRIFT_NOTE]
    routed_modes = [m for m in agg["modes"] if setup["modes"][m]["routing"]["mode"] in ("perplexity", "prototype")]
    if routed_modes:
        first = setup["modes"][routed_modes[0]]["routing"]
        router = first["mode"]
        if first.get("fallback_margin") is not None:
            router += f" (hybrid: perplexity below a margin of {first['fallback_margin']:g})"
        lines += ["", f"Routed evaluation ({router} routing on the first {setup['routing']['prefix_tokens']} "
                  "tokens; routed and oracle drift on the same targets, positions >= P):"]  # fmt: skip
        # How a scored prompt is routed (RoutedEvaluation._score).
        prompt_routing = "each prompt routed by its whole length's perplexity"
        if first["mode"] != "perplexity":
            p = setup["routing"]["prefix_tokens"]
            prompt_routing = f"each prompt routed by the base model's features of its first {p} tokens"
            if first.get("fallback_margin") is not None:
                prompt_routing += "; near-ties by the whole prompt's perplexity"
        for mode in routed_modes:
            row = agg["modes"][mode]
            lines.append(
                f"- {mode}: routed drift {_ms(row['drift_mean_routed_pct'], '+.3f')} %, oracle drift on the same "
                f"targets {_ms(row['drift_mean_oracle_same_targets_pct'], '+.3f')} %, routed base-rel. forgetting "
                f"{_ms(row['base_relative_forgetting_mean_routed_pct'], '+.2f')} %, routed plasticity "
                f"{_ms(row['plasticity_mean_routed'], '.4f')}, routing accuracy (final row, mean over domains) "
                f"{_ms(row['routing_accuracy_mean'], '.3f')}, forwards per routed sequence "
                f"{_ms(row['routing_forwards'], '.2f')} (hybrid's perplexity share {_ms(row['fallback_share'], '.3f')})"
            )
            if row.get("ap_routed", {}).get("n"):  # task metrics: each prompt answered by its routed adapter
                lines[-1] += (
                    f"; routed AP {_ms(row['ap_routed'], '.3f')} (oracle {_ms(row['ap'], '.3f')}), routed BWT_score "
                    f"{_ms(row['bwt_score_routed'], '+.3f')} ({prompt_routing})"
                )
    lines += ["", "Final-row mean held-out loss, all positions, oracle (MERGED: its one adapter):"]
    lines += [f"- {mode}: {_ms(row['final_loss_mean'], '.4f')}" for mode, row in agg["modes"].items()]
    lines += [
        "",
        "Pairs (setting vs the plain-LoRA setting with the same task-adapter sharing), mean ± std over seeds:",
    ]
    for key, p in agg["pairs"].items():
        lines.append(
            f"- {key.replace('_vs_', ' vs ')}: final held-out gain {_ms(p['heldout_improvement_pct'], '+.3f')} %, "
            f"plasticity difference {_ms(p['plasticity_rel_diff_pct'], '+.3f')} %, stability gain "
            f"{_ms(p['stability_gain'], '+.3f')} (pooled over stages: {_ms(p['stability_gain_run_var'], '+.3f')}), "
            f"peak ratio {_ms(p['peak_ratio'], '.3f')}, overhead {_ms(p['overhead'], '.3f')} "
            f"(median of per-round paired ratios: {_ms(p['overhead_paired'], '.3f')})"
        )
    for mode, row in agg["modes"].items():
        crma = setup["modes"][mode].get("crma")
        if not crma:
            continue
        lines.append(
            f"- CRMA effect in {mode} (held-out rows, all blocks): ||h' - h|| / ||h|| = "
            f"{_ms(row['crma_rel_update_mean'], '.2e')} mean, {_ms(row['crma_rel_update_max'], '.2e')} max; "
            f"operator bound ||E||·||R|| = {_ms(row['crma_operator_bound_mean'], '.2e')} (g_max {crma['g_max']:g})"
        )
    lines += ["", "Targets (seed means):"]
    for key, v in verdict.items():
        met = v["met"]
        state = "—" if isinstance(met, Null) else ("met" if met else "MISSED")
        lines.append(f"- {key}: {_f(v['value'], '.4g')} (target {v['target']}): {state}")
    lines += [
        "",
        "Definitions: drift_j = 100 (L[T][j] - L[j][j]) / L[j][j], mean over j < T; base-relative forgetting_j = "
        "100 (L[T][j] - L[0][j]) / L[0][j]; final held-out gain of X vs its LoRA pair = mean over all domains j of "
        "100 (L_LoRA[T][j] - L_X[T][j]) / L_LoRA[T][j] (positive: X ends lower); grad-norm var = per-stage variance "
        "of the per-step gradient norm, averaged over stages; stability gain = 1 - var_X / var_LoRA per seed; "
        "overhead = median step time of X / that of LoRA, per seed (steps: forward + backward + optimizer, "
        "timed per optimizer step, first steps of each stage skipped).",
    ]
    return "\n".join(lines) + "\n"


GAP_DEFINITION = (
    "gap to joint closed (loss) = (NAIVE - X) / (NAIVE - MULTITASK) on the mean final held-out loss (mean over "
    "domains of L[T][j]); (score) = (AP_X - AP_NAIVE) / (AP_MULTITASK - AP_NAIVE); 0 = no better than NAIVE, "
    "1 = as good as joint training, per seed (and order), then averaged"
)


def _scored(agg: dict[str, Any]) -> bool:
    return any(row["ap"]["n"] > 0 for row in agg["modes"].values())


def render_scores(results: dict[str, Any], agg: dict[str, Any]) -> str:
    """Every setting against joint training (MULTITASK) and, with task metrics, its task scores (all runs pooled).

    Empty when neither MULTITASK ran nor any domain has a task metric.
    """
    scored = _scored(agg)
    if "MULTITASK" not in agg["modes"] and not scored:
        return ""
    domains = results["setup"]["domains"]
    groups = len(results["per_seed"])
    head = "| setting | mean final held-out loss | gap to joint closed (loss) |"
    if scored:
        head += f" AP | BWT_score | forgetting (mean) | gap to joint closed (AP) | final score: {' / '.join(domains)} |"
    lines = [
        "",
        f"Against joint training{' and task scores' if scored else ''} (mean ± std over {groups} runs: every "
        "seed of every task order):",
        "",
        head,
        "|" + "---|" * (head.count("|") - 1),
    ]
    for mode, row in agg["modes"].items():
        line = f"| {mode} | {_ms(row['final_loss_mean'], '.4f')} | {_ms(row['gap_to_joint_loss'], '+.3f')} |"
        if scored:
            finals = " / ".join(_f(row["final_score"].get(d, {}).get("mean"), ".3f") for d in domains)
            line += (
                f" {_ms(row['ap'], '.3f')} | {_ms(row['bwt_score'], '+.3f')}"
                f" | {_ms(row['score_forgetting_mean'], '.3f')}"
                f" | {_ms(row['gap_to_joint_score'], '+.3f')} | {finals} |"
            )
        lines.append(line)
    lines += ["", f"Definitions: {GAP_DEFINITION}."]
    if scored:
        lines.append(
            "AP = mean over tasks of S[T][j]; BWT_score = mean over j < T of S[T][j] - S[j][j] (negative = "
            "forgetting); forgetting_j = max over j <= s < T of S[s][j] - S[T][j]; final score = S[T][j] per task "
            "(by name, pooled over orders)."
        )
    return "\n".join(lines) + "\n"


def render_orders(results: dict[str, Any]) -> str:
    """Per task order (``--orders K > 1``): each order's seed means of the headline numbers, and their mean."""
    per_order = results.get("per_order")
    if not per_order:
        return ""
    over = results["over_orders"]
    keys = list(per_order)
    lines = ["", "Task orders (fixed: the given one, its reversal, a half rotation; benchmarks/lib/orders.py):"]
    lines += [f"{k}. {' -> '.join(per_order[k]['domains'])}" for k in keys]
    fields = [
        ("final_loss_mean", ".4f", "mean final held-out loss"),
        ("gap_to_joint_loss", "+.3f", "gap closed (loss)"),
        ("drift_mean_pct", "+.2f", "mean drift %"),
    ]
    if any(over[m]["ap"]["n_orders"] for m in over):
        fields += [("ap", ".3f", "AP"), ("bwt_score", "+.3f", "BWT_score")]
    head = "| setting | " + " | ".join(f"{label}: {' / '.join(f'o{k}' for k in keys)} | mean" for _, _, label in fields)
    lines += ["", "Per order (seed means) and their mean over orders:", "", head + " |"]
    lines.append("|" + "---|" * (1 + 2 * len(fields)))
    for mode, row in over.items():
        cells = []
        for name, spec, _ in fields:
            entry = row[name]
            cells.append(" / ".join(_f(v, spec) for v in entry["per_order"]))
            cells.append(_f(entry["mean"], spec))
        lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
