"""Prototype routing (DESIGN §3.4): right task on separable domains, exact state, prefix only, rank-split sums."""

from __future__ import annotations

import io

import pytest
import torch
from tiny_models import tiny_llama

from crma_lightning.adapters import LoRAConfig, add_lora_adapter, attach_adapters, set_active_adapter
from crma_lightning.routing.policy import ROUTING_MODES, route_batch, validate_routing
from crma_lightning.routing.prototype import (
    PrototypeRouter,
    adapters_off,
    candidate_scores,
    load_router,
    local_task_sums,
    margins,
    pool,
    save_router,
)

P = 8
RANGES = {"a": (0, 6), "b": (40, 46), "c": (80, 86)}  # disjoint small vocabularies: separable domains


def _rows(domain: str, n: int, length: int, seed: int) -> list[list[int]]:
    lo, hi = RANGES[domain]
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(lo, hi, (n, length), generator=gen).tolist()


def _fitted(model, estimator: str = "mahalanobis", world: int = 1, **kwargs) -> PrototypeRouter:
    router = PrototypeRouter(P, estimator=estimator, **kwargs)
    for i, domain in enumerate(RANGES):
        sums = [
            local_task_sums(router, model, _rows(domain, 24, 12, i), 5, torch.device("cpu"), 0, world, r)
            for r in range(world)
        ]
        router.add_task(domain, sum(sums))
    return router


@pytest.mark.parametrize(("estimator", "layer"), [("mahalanobis", -1), ("nearest", 0)])
def test_picks_the_right_task_on_separable_domains(estimator, layer):
    model = tiny_llama()
    router = _fitted(model, estimator, layer=layer)
    assert router.tasks == ["a", "b", "c"] and router.counts.tolist() == [24.0, 24.0, 24.0]
    for i, domain in enumerate(RANGES):
        ids = torch.tensor(_rows(domain, 10, 20, 100 + i))  # held-out rows, longer than the prefix
        choice = router.distances(router.features(model, ids, None)).argmin(dim=1)
        assert choice.tolist() == [i] * 10, (domain, choice)


def test_means_and_covariance_equal_a_hand_computation():
    features = {"a": torch.randn(7, 3, dtype=torch.float64), "b": torch.randn(5, 3, dtype=torch.float64) + 2}
    router = PrototypeRouter(P, shrinkage=0.25)
    for name, x in features.items():
        router.add_task(name, PrototypeRouter.row_sums(x))
    means = torch.stack([x.mean(dim=0) for x in features.values()])
    centred = torch.cat([x - x.mean(dim=0) for x in features.values()])
    cov = centred.T @ centred / (12 - 2)
    cov = 0.75 * cov + 0.25 * torch.trace(cov) / 3 * torch.eye(3, dtype=torch.float64)
    probe = torch.randn(4, 3, dtype=torch.float64)
    diff = probe[:, None] - means[None]
    expected = torch.einsum("bkh,hg,bkg->bk", diff, torch.linalg.inv(cov), diff)
    assert torch.allclose(router.distances(probe), expected, rtol=1e-9, atol=1e-9)
    # A candidate serving several tasks is as near as the nearest of them.
    both = candidate_scores(router, probe, {"x": ["a", "b"]})
    assert torch.equal(both[:, 0], router.distances(probe).min(dim=1).values)


def test_padding_rows_count_for_nothing_and_a_rank_split_sums_to_one_process():
    model = tiny_llama()
    rows = _rows("a", 11, 12, 0)  # 11 rows: with 2 ranks and batches of 4, rank 1 pads its shard
    one = local_task_sums(PrototypeRouter(P), model, rows, 4, torch.device("cpu"), 0)
    split = [local_task_sums(PrototypeRouter(P), model, rows, 4, torch.device("cpu"), 0, 2, r) for r in range(2)]
    assert split[0][0] == 6 and split[1][0] == 5  # row counts: the padded row is not counted
    assert torch.allclose(split[0] + split[1], one, rtol=1e-12, atol=1e-10)
    pooled = pool(torch.ones(2, 3, 4), torch.tensor([[1, 1, 0], [1, 0, 0]]), "mean_last")
    assert pooled.shape == (2, 8) and pooled.dtype == torch.float64


def test_statistics_survive_a_checkpoint_and_a_file_bit_for_bit(tmp_path):
    model = tiny_llama()
    router = _fitted(model, layer=1, pooling="mean_last")
    buffer = io.BytesIO()
    torch.save(router.state_dict(), buffer)
    buffer.seek(0)
    back = PrototypeRouter.from_state(torch.load(buffer, weights_only=True))
    from_file = load_router(save_router(router, tmp_path / "r.safetensors"))
    probe = router.features(model, torch.tensor(_rows("c", 3, 9, 7)), None)
    for other in (back, from_file):
        assert other.settings() == router.settings() and other.tasks == router.tasks
        for key in ("counts", "sums", "second"):
            assert torch.equal(getattr(other, key), getattr(router, key))
        assert torch.equal(other.distances(probe), router.distances(probe))
    with pytest.raises(ValueError, match="fitted with"):
        PrototypeRouter(P, layer=0).load_state_dict(router.state_dict())


def test_the_scored_tokens_are_never_read():
    """Routing on a batch reads its first P tokens only: changing every later token changes no choice."""
    model = tiny_llama()
    attach_adapters(model, "lora", LoRAConfig(r=2, target_modules=["q_proj", "v_proj"]), None, adapter_name="a")
    add_lora_adapter(model, "b", LoRAConfig(r=2, target_modules=["q_proj", "v_proj"]))
    router = _fitted(model)
    rows = _rows("a", 3, 16, 50) + _rows("b", 3, 16, 51)
    ids = torch.tensor(rows)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    swapped = ids.clone()
    swapped[:, P:] = torch.tensor(_rows("b", 3, 8, 52) + _rows("a", 3, 8, 53))  # the other domain after P
    other = {"input_ids": swapped, "attention_mask": torch.ones_like(ids), "labels": swapped.clone()}
    seen: list[int] = []

    def scores(prefix_ids, prefix_mask):
        seen.append(prefix_ids.shape[1])
        with adapters_off(model, lambda name: set_active_adapter(model, name)):
            return candidate_scores(router, router.features(model, prefix_ids, prefix_mask), {"a": ["a"], "b": ["b"]})

    def model_fn(i, m):
        return model(input_ids=i, attention_mask=m).logits

    def run(b):
        return route_batch(model_fn, b, ["a", "b"], P, lambda n: set_active_adapter(model, n), scores_fn=scores)

    first, second = run(batch), run(other)
    assert seen == [P, P]
    assert first.choices == ["a"] * 3 + ["b"] * 3 == second.choices
    assert torch.equal(first.prefix_losses, second.prefix_losses)
    assert "prototype" in ROUTING_MODES
    # The hybrid's fallback path (perplexity on the prefix) reads the first P tokens only, too.
    gen = torch.Generator().manual_seed(1)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # adapters that differ, so the prefix losses decide something
            param.data = torch.randn(param.shape, generator=gen) * 0.5

    def hybrid(b, margin):
        return route_batch(
            model_fn, b, ["a", "b"], P, lambda n: set_active_adapter(model, n), scores_fn=scores, fallback_margin=margin
        )

    for margin in (1e9, 0.0):  # every row falls back, no row does
        one, two = hybrid(batch, margin), hybrid(other, margin)
        assert one.fallback.tolist() == two.fallback.tolist() == [margin > 0] * 6
        assert one.choices == two.choices and torch.equal(one.prefix_losses, two.prefix_losses)
    assert not torch.equal(hybrid(batch, 1e9).prefix_losses, first.prefix_losses)  # perplexity did decide


def test_bad_settings_and_missing_statistics_are_refused():
    with pytest.raises(ValueError, match=r"routing\.pooling"):
        PrototypeRouter(P, pooling="max")
    with pytest.raises(ValueError, match=r"routing\.estimator"):
        PrototypeRouter(P, estimator="knn")
    with pytest.raises(ValueError, match=r"routing\.layer"):
        PrototypeRouter(P, layer=1.5)
    router = PrototypeRouter(P)
    with pytest.raises(ValueError, match="no task statistics"):
        router.distances(torch.zeros(1, 4))
    router.add_task("a", PrototypeRouter.row_sums(torch.ones(2, 4)))
    with pytest.raises(ValueError, match="no routing statistics for tasks"):
        router.distances(torch.zeros(1, 4), ["b"])
    with pytest.raises(ValueError, match="out of range"):
        PrototypeRouter(P, layer=9).features(tiny_llama(), torch.zeros(1, 4, dtype=torch.long), None)


def test_several_layers_and_mean_std_pooling_equal_a_hand_computation(monkeypatch):
    model = tiny_llama()
    ids = torch.tensor(_rows("a", 2, 6, 3))
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    expected = []
    for h in (hidden[1], hidden[-1]):
        rows = [h[0].double(), h[1, :4].double()]  # the real tokens only
        expected.append(torch.stack([torch.cat([r.mean(0), r.std(0, correction=0)]) for r in rows]))
    got = PrototypeRouter(6, layer=[1, -1], pooling="mean_std").features(model, ids, mask)
    assert torch.allclose(got, torch.cat(expected, dim=1), rtol=1e-6, atol=1e-6)
    every = PrototypeRouter(6, layer="all", pooling="mean").features(model, ids, mask)
    assert every.shape == (2, len(hidden) * 32)  # embeddings and every layer, concatenated
    assert PrototypeRouter(6).settings()["layer"] == "auto" and PrototypeRouter(6).pooling == "mean_std"
    import crma_lightning.routing.prototype as prototype

    # auto: every hidden state while that fits AUTO_FEATURES (here 2 x 3 x 32 = 192), else the last one only.
    auto = PrototypeRouter(6).features(model, ids, mask)
    assert torch.equal(auto, PrototypeRouter(6, layer="all").features(model, ids, mask))
    monkeypatch.setattr(prototype, "AUTO_FEATURES", 2 * len(hidden) * 32 - 1)
    narrow = PrototypeRouter(6).features(model, ids, mask)
    assert torch.equal(narrow, PrototypeRouter(6, layer=-1).features(model, ids, mask))
    # auto falls back to the last hidden state (2 H features): within MAX_FEATURES unless H > MAX_FEATURES / 2.
    prototype.check_model(model.config, "auto", "mean_std")
    from types import SimpleNamespace

    huge = SimpleNamespace(hidden_size=prototype.MAX_FEATURES // 2 + 1, num_hidden_layers=2)
    with pytest.raises(ValueError, match="exceed"):
        prototype.check_model(huge, "auto", "mean_std")
    prototype.check_model(huge, "auto", "mean")  # one part per state: within the cap
    monkeypatch.setattr(prototype, "MAX_FEATURES", 2 * len(hidden) * 32 - 1)  # one short of all states' width
    with pytest.raises(ValueError, match="exceed"):
        PrototypeRouter(6, layer="all").features(model, ids, None)


def test_fitting_reads_a_dataset_batch_by_batch_and_distances_stay_on_the_device():
    from datasets import Dataset

    model = tiny_llama()
    rows = _rows("b", 9, 12, 4)
    from_lists = local_task_sums(PrototypeRouter(P), model, rows, 4, torch.device("cpu"), 0, 2, 1)
    dataset = Dataset.from_dict({"input_ids": rows})
    accesses: list[int] = []
    real_getitem = Dataset.__getitem__

    def counted(self, key):  # the rows of each access: one batch at most, never the whole column
        accesses.append(len(key) if isinstance(key, list) else len(range(len(self))[key]) if isinstance(key, slice)
                        else len(self) if isinstance(key, str) else 1)  # fmt: skip
        return real_getitem(self, key)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Dataset, "__getitem__", counted)
        sums = local_task_sums(PrototypeRouter(P), model, dataset, 4, torch.device("cpu"), 0, 2, 1)
    assert torch.equal(sums, from_lists)
    assert accesses and max(accesses) <= 4 and sum(accesses) >= 4  # rank 1 of 2: rows 1, 3, 5, 7
    router = _fitted(model)
    probe = router.features(model, torch.tensor(_rows("c", 2, 9, 8)), None)
    # A meta tensor cannot be copied to the host: the distances are computed where the features are.
    assert router.distances(probe.to("meta")).device.type == "meta"
    assert torch.equal(router.distances(probe), router.distances(probe.clone()))


def test_the_hybrid_falls_back_to_perplexity_on_near_ties_only():
    model = tiny_llama()
    attach_adapters(model, "lora", LoRAConfig(r=2, target_modules=["q_proj", "v_proj"]), None, adapter_name="a")
    add_lora_adapter(model, "b", LoRAConfig(r=2, target_modules=["q_proj", "v_proj"]))
    ids = torch.tensor(_rows("a", 4, 16, 60))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    given = torch.tensor([[0.0, 9.0], [9.0, 0.0], [0.0, 1.0], [1.0, 0.5]])  # margins 4.5, 4.5, 0.5, 0.25

    def run(margin, scores=True):
        return route_batch(
            lambda i, m: model(input_ids=i, attention_mask=m).logits,
            batch,
            ["a", "b"],
            P,
            lambda n: set_active_adapter(model, n),
            scores_fn=(lambda i, m: given) if scores else None,
            fallback_margin=margin,
        )

    by_perplexity, by_prototype = run(None, scores=False).choices, ["a", "b", "a", "b"]
    assert run(None).choices == by_prototype and run(None).fallback is None
    assert run(0.0).choices == by_prototype and run(0.0).fallback.tolist() == [False] * 4
    assert run(100.0).choices == by_perplexity and run(100.0).fallback.tolist() == [True] * 4
    middle = run(1.0)
    assert middle.fallback.tolist() == [False, False, True, True]
    assert middle.choices == by_prototype[:2] + by_perplexity[2:]
    assert torch.equal(margins(given), torch.tensor([4.5, 4.5, 0.5, 0.25]))
    with pytest.raises(ValueError, match="fallback_margin"):
        validate_routing("perplexity", 32, fallback_margin=1.0)
    with pytest.raises(ValueError, match=r"fallback_margin 1\.0 needs estimator 'mahalanobis'.*'nearest'"):
        validate_routing("prototype", 32, fallback_margin=1.0, estimator="nearest")
    from crma_lightning.callbacks.routed_evaluation import RoutedEvaluation

    with pytest.raises(ValueError, match="needs estimator 'mahalanobis'"):
        RoutedEvaluation("prototype", estimator="nearest", fallback_margin=2.0)
    RoutedEvaluation("prototype", estimator="nearest")  # without a margin, nearest is fine


def test_auto_is_resolved_once_at_the_fit_and_a_width_mismatch_names_the_settings(monkeypatch, tmp_path):
    import crma_lightning.routing.prototype as prototype

    model = tiny_llama()
    router = _fitted(model)  # layer auto: every hidden state of the tiny model (3 x 32 x 2 = 192 features)
    assert router.settings()["layer"] == "auto" and router.indices == [0, 1, 2]
    probe_ids = torch.tensor(_rows("c", 3, 9, 7))
    before = router.distances(router.features(model, probe_ids, None))
    # auto would now resolve to the last hidden state only: the fitted router, a checkpoint and a router
    # file keep reading the hidden states the statistics were fitted on.
    monkeypatch.setattr(prototype, "AUTO_FEATURES", 10)
    for other in (
        router,
        PrototypeRouter.from_state(router.state_dict()),
        load_router(save_router(router, tmp_path / "r.safetensors")),
    ):
        assert other.indices == [0, 1, 2]
        assert torch.equal(other.distances(other.features(model, probe_ids, None)), before)
    narrow = PrototypeRouter(P, layer=-1).features(model, probe_ids, None)
    with pytest.raises(ValueError, match=r"64 dimensions, but the statistics have 192.*'layer': 'auto'"):
        router.distances(narrow)


def test_the_solve_builds_no_identity_nor_eigendecomposition_and_sums_accumulate_in_place(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    features = {"a": torch.randn(9, 5, generator=gen, dtype=torch.float64), "b": torch.randn(7, 5, generator=gen)}
    total = PrototypeRouter.row_sums(features["a"][:4])
    same = PrototypeRouter.row_sums(features["a"][4:], into=total)  # batch by batch, in one buffer
    assert same is total and torch.allclose(total, PrototypeRouter.row_sums(features["a"]), rtol=1e-12)
    probe = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    expected = {}
    for estimator in ("mahalanobis", "nearest"):
        router = PrototypeRouter(P, estimator=estimator)
        for name, x in features.items():
            router.add_task(name, PrototypeRouter.row_sums(x))
        expected[estimator] = router
    with monkeypatch.context() as patch:  # a shrunk covariance is positive definite: Cholesky, no F x F identity
        patch.setattr(torch, "eye", lambda *a, **k: pytest.fail("an identity matrix was built"))
        patch.setattr(torch.linalg, "pinv", lambda *a, **k: pytest.fail("pinv (an eigendecomposition) was run"))
        got = {name: router.distances(probe) for name, router in expected.items()}
    means = torch.stack([x.double().mean(dim=0) for x in features.values()])
    assert torch.allclose(got["nearest"], ((probe[:, None] - means[None]) ** 2).sum(-1), rtol=1e-12, atol=1e-12)
    centred = torch.cat([x.double() - x.double().mean(dim=0) for x in features.values()])
    cov = centred.T @ centred / (16 - 2)
    cov = 0.99 * cov + 0.01 * torch.trace(cov) / 5 * torch.eye(5, dtype=torch.float64)
    diff = probe[:, None] - means[None]
    want = torch.einsum("bkh,hg,bkg->bk", diff, torch.linalg.inv(cov), diff)
    assert torch.allclose(got["mahalanobis"], want, rtol=1e-9, atol=1e-9)
    # No shrinkage and fewer rows than features: a singular covariance, solved by the pseudo-inverse instead.
    few = PrototypeRouter(P, shrinkage=0.0)
    few.add_task("a", PrototypeRouter.row_sums(features["a"][:2]))
    few.add_task("b", PrototypeRouter.row_sums(features["b"][:2]))
    assert torch.isfinite(few.distances(probe)).all()
