"""Numbers of the continual benchmark: per run, per seed pair, aggregated over seeds; JSON and Markdown.

Every number that cannot be computed is a :class:`Null` carrying the reason; :func:`to_json` turns it
into JSON ``null`` and records the reason under ``null_reasons`` (keyed by the field's path), so a
reader of ``results.json`` never meets an unexplained ``null`` or a non-finite number.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any

from crma_lightning.metrics import continual as metrics

LORA_PAIRS = {
    "CRMA-shared": "NAIVE",
    "MODULAR": "FROZEN",
    "REPLAY": "NAIVE",
    "EWC": "NAIVE",
    "O-LORA": "FROZEN",
    "CRMA-shared-v1": "NAIVE",
    "MODULAR-v1": "FROZEN",
    "CRMA-shared-mix": "NAIVE",
    "MODULAR-mix": "FROZEN",
    "CRMA-shared-g0.5": "NAIVE",
    "MODULAR-g0.5": "FROZEN",
}
"""Each CRMA or method setting and the plain-LoRA setting it is compared with (same task-adapter sharing).
A pair is computed only when both of its settings ran."""

CRMA_PAIRS = ("CRMA-shared", "MODULAR")
"""The pairs the product targets (issue #7) are stated for."""

TARGETS = {
    "modular_abs_drift_pct_max": 0.5,
    "naive_over_modular_forgetting_min": 10.0,
    "stability_gain_min": 0.39,
    "plasticity_rel_diff_pct_max": 2.0,
    "overhead_max": 1.05,
}


@dataclass(frozen=True)
class Null:
    """A value that is undefined, and why."""

    reason: str


def _num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _or_null(x: Any, reason: str) -> Any:
    return x if _num(x) else Null(reason)


# ---------------------------------------------------------------------- one run
def run_numbers(raw: dict[str, Any], time_skip: int) -> dict[str, Any]:
    """Metrics of one run from its report and step times.

    Args:
        raw: What ``runs._run_one`` returned.
        time_skip: Steps at the start of each stage left out of the step-time median.
    """
    report, failed = raw["report"], raw["error"]  # MERGED: an `evaluate --merge` report (lib/merged.py)
    if report is None or report.get("status") != "complete":
        why = f"run did not complete: {failed or (report or {}).get('status')}"
        return {"status": Null(why), "error": failed or Null("no exception was raised")}
    domains = report["domains"]
    m = report["metrics"]
    matrix = report["loss_matrix"]["values"]
    out: dict[str, Any] = {"status": "complete", "run_dir": raw["run_dir"], "domains": domains}
    out["loss_matrix"] = [[_or_null(v, "not evaluated (future domain)") for v in row] for row in matrix]
    out["final_losses"] = dict(zip(domains, matrix[-1]))
    out["base_losses"] = {d: _or_null(v, "base not evaluated") for d, v in zip(domains, matrix[0])}  # L[0]
    finals = [v for v in matrix[-1] if _num(v)]
    out["final_loss_mean"] = _or_null(statistics.fmean(finals) if finals else None, "no final-row loss")

    out["final_loss_mean"] = _or_null(statistics.fmean(matrix[-1]) if None not in matrix[-1] else None, "missing")
    out["scores"] = score_numbers(report)
    for key in ("drift", "base_relative_forgetting", "plasticity"):
        out[key] = {d: _or_null(v, "undefined for the last domain") for d, v in m[key].items()}
    out["drift_mean"] = _or_null(m["drift_mean"], "fewer than two stages")
    out["base_relative_forgetting_mean"] = _or_null(m["base_relative_forgetting_mean"], "fewer than two stages")
    out["bwt"] = _or_null(m["bwt"], "fewer than two stages")
    out["fwt"] = _or_null(m["fwt"], "future domains are not evaluated (eval_domains='seen'; --eval-domains all)")
    out["plasticity_mean"] = m["plasticity_mean"]
    grads = report.get("gradients") or {}  # MERGED is not trained: no gradients
    stage_stats = grads.get("stages", {})
    variances = [s["var"] for s in stage_stats.values() if _num(s["var"])]
    out["grad"] = {
        "stages": {
            k: {f: _or_null(s[f], "no step after warm-up") for f in ("steps", "mean", "var", "peak")}
            for k, s in stage_stats.items()
        },
        "var_stage_mean": _or_null(statistics.fmean(variances) if variances else None, "no stage variance"),
        "var_run": _or_null(grads.get("run", {}).get("var"), "no step after warm-up (or not trained)"),
        "peak": _or_null(grads.get("run", {}).get("peak"), "no step after warm-up (or not trained)"),
    }
    times = {k: v[time_skip:] for k, v in raw["step_times"].items()}
    flat = [t for v in times.values() for t in v]
    out["step_time"] = {
        "median_ms": _or_null(1e3 * statistics.median(flat) if flat else None, f"no step after the first {time_skip}"),
        "timed_steps": len(flat),
        "skipped_per_stage": time_skip,
        "stage_median_ms": {k: 1e3 * statistics.median(v) for k, v in times.items() if v},
        "all_ms": {k: [round(1e3 * t, 3) for t in v] for k, v in raw["step_times"].items()},
    }
    effect = raw.get("crma_effect") or {}
    out["crma_effect"] = {
        k: _or_null(effect.get(k), "no CRMA adapter in this setting")
        for k in ("rel_update_mean", "rel_update_max", "gate_mean", "operator_bound_mean", "g_max")
    }
    out["method"] = _method_numbers(report.get("method"))
    out["routing"] = _routing_numbers(report.get("routing"), domains, out)
    out["timings"] = report["timings"]
    out["wall_s"] = raw["wall_s"]
    return out


NO_SCORES = "no domain has a task metric (loss domains; --suite tasks scores every stage)"


def score_numbers(report: dict[str, Any]) -> dict[str, Any]:
    """Task scores of one run (docs/metrics.md): AP, BWT_score, forgetting, final and own-stage scores per domain.

    From the report's ``score_matrix`` (``S[s][j]``, filled for domains with a ``metric``); every entry is a
    :class:`Null` saying why when the run's domains have no metric.
    """
    section = report.get("score_matrix")
    if not section:
        keys = ("ap", "bwt_score", "forgetting_mean", "forgetting", "final", "plasticity", "matrix")
        return {k: Null(NO_SCORES) for k in keys}
    domains, values = section["columns"], section["values"]
    return {
        "ap": _or_null(section.get("ap"), "no trained domain has a score"),
        "bwt_score": _or_null(section.get("bwt_score"), "fewer than two scored stages"),
        "forgetting_mean": _or_null(section.get("forgetting_mean"), "fewer than two scored stages"),
        "forgetting": {d: _or_null(v, "undefined for the last domain") for d, v in section["forgetting"].items()},
        "final": {d: _or_null(v, "domain has no metric") for d, v in zip(domains, values[-1])},
        "plasticity": {d: _or_null(v, "domain has no metric") for d, v in section["score_plasticity"].items()},
        "matrix": [[_or_null(v, "not evaluated or no metric") for v in row] for row in values],
    }


def gap_to_joint(runs: dict[str, dict[str, Any]]) -> None:
    """Add ``gap_to_joint`` to every run of one seed (and order): how much of NAIVE's gap to MULTITASK it closes.

    ``loss`` = (NAIVE - X) / (NAIVE - MULTITASK) on the mean final held-out loss (mean over domains of
    ``L[T][j]``); ``score`` = (AP_X - AP_NAIVE) / (AP_MULTITASK - AP_NAIVE). 0 = no better than naive
    sequential fine-tuning, 1 = as good as joint training, > 1 = better than joint training.
    """
    naive, joint = runs.get("NAIVE", {}), runs.get("MULTITASK", {})
    for run in runs.values():
        if run.get("status") != "complete":
            continue
        if naive.get("status") != "complete" or joint.get("status") != "complete":
            why = "needs NAIVE and MULTITASK complete in this seed (--settings ... NAIVE MULTITASK)"
            run["gap_to_joint"] = {"loss": Null(why), "score": Null(why)}
            continue
        run["gap_to_joint"] = {
            "loss": _or_null(
                _closed(naive["final_loss_mean"], run["final_loss_mean"], joint["final_loss_mean"]),
                "a mean final loss is missing, or NAIVE and MULTITASK end at the same loss",
            ),
            "score": _or_null(
                _closed(naive["scores"]["ap"], run["scores"]["ap"], joint["scores"]["ap"]),
                "no AP (no task metric), or NAIVE and MULTITASK have the same AP",
            ),
        }


def _closed(naive: Any, x: Any, joint: Any) -> float | None:
    """``(x - naive) / (joint - naive)``: the share of the naive-to-joint gap that ``x`` closes."""
    if not (_num(naive) and _num(x) and _num(joint)) or joint == naive:
        return None
    return (x - naive) / (joint - naive)


def _method_numbers(method: dict[str, Any] | None) -> dict[str, Any]:
    """The method's report entry, with ``state_bytes`` (the memory its state holds) up front."""
    if not method:
        return {"name": "none", "state_bytes": Null("plain fine-tuning: no method"), "summary": Null("no method")}
    return {
        "name": method.get("method"),
        "state_bytes": _or_null(method.get("state_bytes"), "the method's summary has no state_bytes"),
        "summary": {k: v for k, v in method.items() if v is not None},  # unset options (replay fraction) left out
    }


NO_ROUTING = "routing not needed: every task activates the same adapters (routed = oracle)"


def _routing_numbers(routing: dict[str, Any] | None, domains: list[str], run: dict[str, Any]) -> dict[str, Any]:
    """Task-agnostic (routed) evaluation of one run, next to the oracle numbers on the same targets.

    ``perplexity``: routed mean drift / base-relative forgetting / plasticity (targets at positions >= P),
    the oracle drift on those same targets, and the routing accuracy (final row, mean over domains).
    ``none``: the evaluation needs no task identity, so routed = oracle and the oracle numbers are copied.
    ``oracle``: not evaluated routed (each number is a ``Null`` saying so).
    """
    routing = routing or {"mode": "oracle"}
    mode = routing.get("mode", "oracle")
    out: dict[str, Any] = {"mode": mode, "prefix_tokens": routing.get("prefix_tokens", Null("no routed evaluation"))}
    keys = ("drift_mean_routed", "base_relative_forgetting_mean_routed", "plasticity_mean_routed")
    if mode in ("none", "merged"):  # merged: one adapter for every domain, no task identity either
        out.update(
            drift_mean_routed=run["drift_mean"],
            base_relative_forgetting_mean_routed=run["base_relative_forgetting_mean"],
            plasticity_mean_routed=run["plasticity_mean"],
            drift_mean_oracle_same_targets=run["drift_mean"],
            routing_accuracy_mean=Null(NO_ROUTING),
            routing_accuracy_final=Null(NO_ROUTING),
            loss_matrix_routed=Null(NO_ROUTING),
        )
        return out
    matrix = routing.get("loss_matrix_routed")
    if mode not in ("perplexity", "prototype") or not matrix:
        why = "not evaluated routed (routing mode 'oracle' for this setting)"
        for key in (*keys, "drift_mean_oracle_same_targets", "routing_accuracy_mean", "routing_accuracy_final"):
            out[key] = Null(why)
        out["loss_matrix_routed"] = Null(why)
        return out
    routed = routing.get("metrics_routed") or metrics.summarize(matrix, domains)
    same = metrics.summarize(routing["loss_matrix_oracle_same_targets"], domains)
    out["drift_mean_routed"] = _or_null(routed.get("drift_mean"), "fewer than two stages")
    out["base_relative_forgetting_mean_routed"] = _or_null(
        routed.get("base_relative_forgetting_mean"), "fewer than two stages"
    )
    out["plasticity_mean_routed"] = _or_null(routed.get("plasticity_mean"), "missing")
    out["drift_mean_oracle_same_targets"] = _or_null(same.get("drift_mean"), "fewer than two stages")
    final = routing.get("routing_accuracy_final") or {}
    accs = [v for v in final.values() if _num(v)]
    out["routing_accuracy_final"] = {d: _or_null(v, "domain not trained") for d, v in final.items()}
    out["routing_accuracy_mean"] = _or_null(statistics.fmean(accs) if accs else None, "no trained domain routed")
    out["loss_matrix_routed"] = [[_or_null(v, "not evaluated (future domain)") for v in row] for row in matrix]
    out["routing_forwards"] = _or_null(routing.get("routing_forwards_final"), "not recorded by this library version")
    shares = [v for v in (routing.get("fallback_share_final") or {}).values() if _num(v)]
    out["fallback_share"] = _or_null(statistics.fmean(shares) if shares else None, "not the hybrid")
    scored = routing.get("score_metrics_routed") or {}  # task metrics: each prompt answered by its routed adapter
    out["ap_routed"] = _or_null(scored.get("ap"), "no routed task scores (the domains have no metric)")
    out["bwt_score_routed"] = _or_null(scored.get("bwt_score"), "no routed task scores, or fewer than two stages")
    return out


# ---------------------------------------------------------------------- pairs within a seed
def _get(run: dict[str, Any], *path: str) -> Any:
    for key in path:
        if not isinstance(run, dict) or key not in run:
            return None
        run = run[key]
    return run


def _rel(x: Any, ref: Any) -> float | None:
    return 100.0 * (x - ref) / ref if _num(x) and _num(ref) and ref != 0 else None


def _paired_time_ratio(x: dict[str, list[float]], ref: dict[str, list[float]], skip: int) -> float | None:
    """Median over steps of ``t_X[k] / t_LoRA[k]`` for steps taken in the same round (same stage, index)."""
    ratios = [a / b for s in ref if s in x for a, b in zip(x[s][skip:], ref[s][skip:]) if b > 0]
    return statistics.median(ratios) if ratios else None


def pair_numbers(runs: dict[str, dict[str, Any]], raws: dict[str, dict[str, Any]], skip: int, step: bool):
    """CRMA setting vs its LoRA pair, for one seed (see :data:`LORA_PAIRS`)."""
    out: dict[str, Any] = {}
    for x, ref in LORA_PAIRS.items():
        if x not in runs or ref not in runs:
            continue
        rx, rr = runs[x], runs[ref]
        why = f"{x} or {ref} did not complete"
        if rx.get("status") != "complete" or rr.get("status") != "complete":
            out[f"{x}_vs_{ref}"] = Null(why)
            continue
        # improvement_j = 100 (L_ref[T][j] - L_X[T][j]) / L_ref[T][j]: positive = X ends lower (better).
        fx, fr = rx["final_losses"], rr["final_losses"]
        improvements = [-r if (r := _rel(fx[d], fr[d])) is not None else None for d in rx["domains"]]
        paired = _paired_time_ratio(raws[x]["step_times"], raws[ref]["step_times"], skip) if step else None
        out[f"{x}_vs_{ref}"] = {
            "heldout_improvement_pct": _or_null(
                statistics.fmean(improvements) if None not in improvements else None, "a final loss is missing"
            ),
            "stability_gain": _or_null(
                metrics.stability_gain(_get(rx, "grad", "var_stage_mean"), _get(rr, "grad", "var_stage_mean")),
                "a variance is missing or the LoRA variance is 0",
            ),
            "stability_gain_run_var": _or_null(
                metrics.stability_gain(_get(rx, "grad", "var_run"), _get(rr, "grad", "var_run")),
                "a variance is missing or the LoRA variance is 0",
            ),
            "peak_ratio": _or_null(_ratio(_get(rx, "grad", "peak"), _get(rr, "grad", "peak")), "a peak is missing"),
            "plasticity_rel_diff_pct": _or_null(_rel(rx["plasticity_mean"], rr["plasticity_mean"]), "missing"),
            "overhead": _or_null(
                metrics.overhead(_get(rx, "step_time", "median_ms"), _get(rr, "step_time", "median_ms")),
                "a median step time is missing",
            ),
            "overhead_paired": _or_null(paired, "only with --interleave step (steps of one round are paired)"),
        }
    return out


def _ratio(a: Any, b: Any) -> float | None:
    return a / b if _num(a) and _num(b) and b != 0 else None


# ---------------------------------------------------------------------- over seeds
def stats(values: list[Any]) -> dict[str, Any]:
    """``mean``, ``std`` (sample, ddof=1), ``min``, ``max``, ``n`` of the finite values."""
    xs = [v for v in values if _num(v)]
    if not xs:
        return {"n": 0, **{k: Null("no seed produced this number") for k in ("mean", "std", "min", "max")}}
    std = statistics.stdev(xs) if len(xs) > 1 else Null("one seed: no spread")
    return {"n": len(xs), "mean": statistics.fmean(xs), "std": std, "min": min(xs), "max": max(xs)}


RUN_FIELDS = {
    "drift_mean_pct": ("drift_mean",),
    "base_relative_forgetting_mean_pct": ("base_relative_forgetting_mean",),
    "bwt": ("bwt",),
    "plasticity_mean": ("plasticity_mean",),
    "grad_var": ("grad", "var_stage_mean"),
    "grad_var_run": ("grad", "var_run"),
    "grad_peak": ("grad", "peak"),
    "step_median_ms": ("step_time", "median_ms"),
    "crma_rel_update_mean": ("crma_effect", "rel_update_mean"),
    "crma_rel_update_max": ("crma_effect", "rel_update_max"),
    "crma_operator_bound_mean": ("crma_effect", "operator_bound_mean"),
    "drift_mean_routed_pct": ("routing", "drift_mean_routed"),
    "drift_mean_oracle_same_targets_pct": ("routing", "drift_mean_oracle_same_targets"),
    "base_relative_forgetting_mean_routed_pct": ("routing", "base_relative_forgetting_mean_routed"),
    "plasticity_mean_routed": ("routing", "plasticity_mean_routed"),
    "routing_accuracy_mean": ("routing", "routing_accuracy_mean"),
    "routing_forwards": ("routing", "routing_forwards"),
    "fallback_share": ("routing", "fallback_share"),
    "ap_routed": ("routing", "ap_routed"),
    "bwt_score_routed": ("routing", "bwt_score_routed"),
    "final_loss_mean": ("final_loss_mean",),
    "method_state_bytes": ("method", "state_bytes"),
    "gap_to_joint_loss": ("gap_to_joint", "loss"),
    "ap": ("scores", "ap"),
    "bwt_score": ("scores", "bwt_score"),
    "score_forgetting_mean": ("scores", "forgetting_mean"),
    "gap_to_joint_score": ("gap_to_joint", "score"),
}
PAIR_FIELDS = (
    "heldout_improvement_pct",
    "stability_gain",
    "stability_gain_run_var",
    "peak_ratio",
    "plasticity_rel_diff_pct",
    "overhead",
    "overhead_paired",
)


def aggregate(per_seed: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Mean/std/range over seeds of every run metric (per mode) and every pair metric."""
    seeds = list(per_seed)
    modes = list(per_seed[seeds[0]]["runs"])
    agg: dict[str, Any] = {"modes": {}, "pairs": {}}
    for mode in modes:
        agg["modes"][mode] = {
            name: stats([_get(per_seed[s]["runs"][mode], *path) for s in seeds]) for name, path in RUN_FIELDS.items()
        }
        agg["modes"][mode].update(_per_domain(per_seed, mode))
    for pair in per_seed[seeds[0]]["pairs"]:
        agg["pairs"][pair] = {f: stats([_get(per_seed[s]["pairs"], pair, f) for s in seeds]) for f in PAIR_FIELDS}
    agg["base_loss"] = base_losses(per_seed)
    return agg


def base_losses(per_seed: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """``L[0][j]`` per domain: the base's held-out loss before any stage, over every seed and setting.

    Every setting of a seed starts from the same base and held-out rows, so the values differ only by
    what an adapter at initialisation adds (nothing: B = 0, W~ = 0); ``max - min`` shows it.
    """
    values: dict[str, list[Any]] = {}
    for seed in per_seed.values():
        for run in seed["runs"].values():
            for domain, v in (run.get("base_losses") or {}).items():
                values.setdefault(domain, []).append(v)
    return {d: stats(v) for d, v in values.items()}


def _per_domain(per_seed: dict[str, dict[str, Any]], mode: str) -> dict[str, Any]:
    """Stats over seeds of the final held-out loss and final task score of every domain (keyed by name,
    so runs on different task orders pool per domain)."""
    runs = [r["runs"][mode] for r in per_seed.values()]
    names = next((r["domains"] for r in runs if r.get("status") == "complete"), [])
    return {
        "final_loss": {d: stats([_get(r, "final_losses", d) for r in runs]) for d in names},
        "final_score": {d: stats([_get(r, "scores", "final", d) for r in runs]) for d in names},
    }


ORDER_FIELDS = (
    "final_loss_mean", "gap_to_joint_loss", "drift_mean_pct", "base_relative_forgetting_mean_pct", "bwt",
    "plasticity_mean", "ap", "bwt_score", "score_forgetting_mean", "gap_to_joint_score",
)  # fmt: skip
"""Run fields that ``results.md`` shows per task order and as the mean over orders."""


def over_orders(per_order: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per setting and field of :data:`ORDER_FIELDS`: each order's seed mean and their mean over orders.

    Args:
        per_order: ``{order number: {"aggregates": aggregate(that order's seeds), ...}}``.

    Returns:
        ``{mode: {field: {"per_order": [mean of order 1, ...], "mean": mean over orders, "n_orders": n}}}``;
        an order without the number gives a :class:`Null` in ``per_order`` and is left out of the mean.
    """
    keys = list(per_order)
    modes = list(per_order[keys[0]]["aggregates"]["modes"])
    out: dict[str, Any] = {}
    for mode in modes:
        out[mode] = {}
        for name in ORDER_FIELDS:
            means = [_get(per_order[k]["aggregates"], "modes", mode, name, "mean") for k in keys]
            finite = [m for m in means if _num(m)]
            out[mode][name] = {
                "per_order": [m if _num(m) else Null("no seed of this order produced the number") for m in means],
                "mean": statistics.fmean(finite) if finite else Null("no order produced this number"),
                "n_orders": len(finite),
            }
    return out


def verdicts(agg: dict[str, Any]) -> dict[str, Any]:
    """The product targets (issue #7) against the seed means; ``met`` is a plain bool."""

    def mean(*path: str) -> Any:
        v = _get(agg, *path, "mean")
        return v if _num(v) else None

    def check(value: Any, ok: bool | None, target: str, why: str) -> dict[str, Any]:
        if value is None:
            return {"value": Null(why), "target": target, "met": Null(why)}
        return {"value": value, "target": target, "met": bool(ok)}

    mod, naive = mean("modes", "MODULAR", "drift_mean_pct"), mean("modes", "NAIVE", "drift_mean_pct")
    ratio = naive / abs(mod) if naive is not None and mod not in (None, 0) else None
    out = {
        "modular_abs_drift_pct": check(
            abs(mod) if mod is not None else None,
            mod is not None and abs(mod) <= TARGETS["modular_abs_drift_pct_max"],
            "|mean drift| of MODULAR <= 0.5%",
            "MODULAR mean drift missing",
        ),
        "naive_over_modular_drift": check(
            ratio,
            ratio is not None and ratio >= TARGETS["naive_over_modular_forgetting_min"],
            "NAIVE mean drift >= 10x |MODULAR mean drift|",
            "a mean drift is missing or MODULAR's is exactly 0",
        ),
    }
    for pair in LORA_PAIRS.items():
        key = f"{pair[0]}_vs_{pair[1]}"
        if key not in agg["pairs"] or not (pair[0] in CRMA_PAIRS or pair[0].startswith(CRMA_PAIRS)):
            continue  # the targets are stated for CRMA (and its ablation variants) against their LoRA pair
        gain, plast = mean("pairs", key, "stability_gain"), mean("pairs", key, "plasticity_rel_diff_pct")
        over = mean("pairs", key, "overhead")
        out[f"stability_gain_{key}"] = check(
            gain, gain is not None and gain >= TARGETS["stability_gain_min"], ">= 0.39", "missing"
        )
        out[f"plasticity_{key}"] = check(
            plast, plast is not None and abs(plast) <= TARGETS["plasticity_rel_diff_pct_max"], "within 2%", "missing"
        )
        out[f"overhead_{key}"] = check(over, over is not None and over <= TARGETS["overhead_max"], "<= 1.05", "missing")
    return out


# ---------------------------------------------------------------------- serialisation
def to_json(value: Any, reasons: dict[str, str], path: str = "") -> Any:
    """JSON-safe copy of ``value``; ``Null`` and non-finite floats become ``None`` with a reason."""
    if isinstance(value, Null):
        reasons[path] = value.reason
        return None
    if isinstance(value, float) and not math.isfinite(value):
        reasons[path] = f"non-finite value ({value}) produced by the run"
        return None
    if value is None:
        reasons[path] = "no value recorded (unexplained: please report)"
        return None
    if isinstance(value, dict):
        return {str(k): to_json(v, reasons, f"{path}/{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(v, reasons, f"{path}/{i}") for i, v in enumerate(value)]
    return value
