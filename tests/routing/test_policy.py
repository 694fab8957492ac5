"""Perplexity routing (DESIGN §3.4): picks the right adapter, never reads the scored tokens, counts right."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny_models import tiny_llama

from crma_lightning.adapters import LoRAConfig, add_lora_adapter, attach_adapters, set_active_adapter
from crma_lightning.losses import row_token_losses
from crma_lightning.routing.policy import ROUTING_MODES, route_batch, routing_accuracy, scored_labels, validate_routing

V = 8
NEXT = {"a": lambda t: (t + 1) % 4, "b": lambda t: 4 + (t - 4 + 3) % 4}  # a: 0→1→2→3→0, b: 4→7→6→5→4
NEXT["a_copy"] = NEXT["a"]  # predicts exactly like "a": a tie


def _sequence(domain: str, start: int, length: int) -> list[int]:
    seq = [start]
    for _ in range(length - 1):
        seq.append(NEXT[domain](seq[-1]))
    return seq


def _batch(rows: list[list[int]]) -> dict:
    length = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


class ToyModel:
    """Adapter ``x`` predicts domain ``x``'s next token. ``cheat``: NOT causal - in every row with a 7 anywhere in
    its input, adapter ``b`` reads each next token from the input itself, so peeking past the prefix would flip
    the choice to ``b``."""

    def __init__(self, cheat: bool = False) -> None:
        self.active = "a"
        self.cheat = cheat
        self.calls: list[tuple[str, int]] = []

    def activate(self, name: str) -> None:
        self.active = name

    def __call__(self, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        self.calls.append((self.active, ids.shape[1]))
        logits = F.one_hot(ids.clone().apply_(NEXT[self.active]), V).float() * 4.0  # (B, T, V)
        if self.cheat and self.active == "b":
            leak = (ids == 7).any(dim=1)  # (B,) depends on the whole row
            logits[leak, :-1] = F.one_hot(ids[leak, 1:], V).float() * 20.0
        return logits


def test_routes_separable_domains_and_scores_only_the_rest():
    rows = [_sequence("a", 0, 20), _sequence("b", 4, 20), _sequence("a", 2, 11), _sequence("b", 6, 5)]
    batch = _batch(rows)
    model = ToyModel()
    choices, loss_sum, tokens, prefix_losses, scored_sums = route_batch(model, batch, ["a", "b"], 8, model.activate)
    assert choices == ["a", "b", "a", "b"]
    assert prefix_losses.shape == (4, 2)
    # Scored targets: positions 8.. of each row (padding excluded); a 5-token row has none.
    assert tokens.item() == (20 - 8) + (20 - 8) + (11 - 8) + 0
    # The routed sum equals the oracle pass on the same (prefix-masked) targets.
    expected = 0.0
    for name, idx in (("a", [0, 2]), ("b", [1, 3])):
        model.activate(name)
        sums, _ = row_token_losses(
            model(batch["input_ids"], batch["attention_mask"]), scored_labels(batch["labels"], 8)
        )
        expected += sums[idx].sum().item()
    assert loss_sum.item() == pytest.approx(expected, rel=1e-6)
    # Column k of scored_sums: every row's scored loss under adapter k (the oracle pass of that adapter).
    chosen = scored_sums.gather(1, torch.tensor([[0], [1], [0], [1]])).sum()
    assert chosen.item() == pytest.approx(loss_sum.item(), rel=1e-6) and scored_sums.shape == (4, 2)
    # One prefix-only forward (length P) and one full forward per adapter, whatever the choices.
    assert sorted(model.calls[:4]) == [("a", 8), ("a", 20), ("b", 8), ("b", 20)]
    assert routing_accuracy(choices[:1], "a") == 1.0 and routing_accuracy(choices, "a") == 0.5


def test_tokens_after_the_prefix_never_change_the_choice():
    base_rows = [_sequence("a", s, 16) for s in range(4)]
    model = ToyModel(cheat=True)
    reference = route_batch(model, _batch(base_rows), ["a", "b"], 6, model.activate)
    assert reference.choices == ["a"] * 4
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        rows = [r[:6] + torch.randint(0, V, (10,), generator=gen).tolist() for r in base_rows]
        rows[0][-1] = 7  # what the cheating model would jump on, had it seen the scored part
        routed = route_batch(model, _batch(rows), ["a", "b"], 6, model.activate)
        assert routed.choices == reference.choices
        torch.testing.assert_close(routed.prefix_losses, reference.prefix_losses, rtol=0, atol=0)
    # Sanity: with a 7 inside the prefix the cheating model does win - the test can see a leak.
    rows = [[*r[:5], 7, *r[6:]] for r in base_rows]
    assert route_batch(model, _batch(rows), ["a", "b"], 6, model.activate).choices == ["b"] * 4


def test_prompt_response_rows_are_routed_on_their_unlabelled_prompt():
    """Labels -100 on the prefix (a prompt/response row scores only its response): routing still reads the
    prefix's tokens. Before the fix every prefix loss was 0, a tie, and every row went to the first adapter."""
    rows = [_sequence("b", 4, 12), _sequence("a", 0, 12), _sequence("b", 5, 12)]
    batch = _batch(rows)
    batch["labels"][:, :6] = -100  # the prompt: unscored
    model = ToyModel()
    routed = route_batch(model, batch, ["a", "b"], 6, model.activate)
    assert routed.choices == ["b", "a", "b"]
    assert bool((routed.prefix_losses > 0).any())
    # The scored targets are still only the labelled ones after P.
    assert routed.tokens.item() == 3 * (12 - 6)


def test_ties_and_validation():
    model = ToyModel()
    batch = _batch([_sequence("a", 0, 10)])
    assert route_batch(model, batch, ["a_copy", "a"], 4, model.activate).choices == ["a_copy"]  # ties: first
    assert route_batch(model, batch, ["a", "a_copy"], 4, model.activate).choices == ["a"]
    with pytest.raises(ValueError, match="at least one adapter"):
        route_batch(model, batch, [], 4, model.activate)
    with pytest.raises(ValueError, match="prefix_tokens=1"):
        route_batch(model, batch, ["a"], 1, model.activate)
    assert set(ROUTING_MODES) == {"oracle", "perplexity", "prototype", "none"}
    validate_routing("perplexity", 32)
    with pytest.raises(ValueError, match=r"evaluation.routing='ppl'.*\['oracle', 'perplexity', 'prototype', 'none'\]"):
        validate_routing("ppl")
    with pytest.raises(ValueError, match="prefix_tokens=0"):
        validate_routing("perplexity", 0)


def _lm_domain(domain: str, n: int, length: int, gen: torch.Generator) -> torch.Tensor:
    lo = 10 if domain == "a" else 60  # disjoint token ranges, each a fixed cycle of 10 tokens
    starts = torch.randint(0, 10, (n, 1), generator=gen)
    steps = torch.arange(length)[None, :] * (1 if domain == "a" else 3)
    return lo + (starts + steps) % 10  # (n, length)


def test_perplexity_routing_on_a_tiny_lm_with_trained_adapters():
    torch.manual_seed(0)
    model = tiny_llama()
    attach_adapters(model, "lora", LoRAConfig(r=4, alpha=8), adapter_name="a")
    add_lora_adapter(model, "b", LoRAConfig(r=4, alpha=8), trainable=False)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for name in ("a", "b"):
        set_active_adapter(model, name)
        params = [p for n, p in model.named_parameters() if f".{name}." in n]
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.AdamW(params, lr=2e-2)
        for _ in range(25):
            ids = _lm_domain(name, 8, 24, gen)
            loss = model(ids, labels=ids).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        for p in params:
            p.requires_grad_(False)
    model.eval()

    def model_fn(ids, mask):
        return model(input_ids=ids, attention_mask=mask).logits

    def activate(name):
        set_active_adapter(model, name)

    for domain in ("a", "b"):
        ids = _lm_domain(domain, 6, 32, gen)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
        routed = route_batch(model_fn, batch, ["a", "b"], 8, activate)
        assert routed.choices == [domain] * 6
        assert routed.tokens.item() == 6 * (32 - 8)
        # Perturbing the scored part leaves the choice and the prefix losses untouched (causal or not).
        tail = _lm_domain("b" if domain == "a" else "a", 6, 24, gen)  # the other domain's tokens after the prefix
        new_ids = torch.cat([ids[:, :8], tail], dim=1)
        perturbed = dict(batch, input_ids=new_ids, labels=new_ids.clone())
        again = route_batch(model_fn, perturbed, ["a", "b"], 8, activate)
        assert again.choices == routed.choices
        torch.testing.assert_close(again.prefix_losses, routed.prefix_losses, rtol=0, atol=0)
