"""The local HFedMoE round (hfedmoe.training.train_local) and evaluation, on a tiny model."""

from __future__ import annotations

import copy

import math

import pytest
import torch

from hfedmoe import core
from hfedmoe.moe.modular import ModularMoEAccess
from hfedmoe.training import LocalTrainConfig, evaluate, make_optimizer, train_local

from builders import L, LABELS, S, VOCAB, tiny_moe


def random_batch(g: torch.Generator, b: int = 6, t: int = 10) -> dict[str, torch.Tensor]:
    ids = torch.randint(1, VOCAB, (b, t), generator=g)
    lengths = torch.randint(3, t + 1, (b,), generator=g)
    lengths[0] = t
    mask = (torch.arange(t)[None, :] < lengths[:, None]).long()
    ids = ids * mask  # padding id 0
    labels = torch.randint(0, LABELS, (b,), generator=g)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def endless(seed: int = 0, **kw):
    g = torch.Generator().manual_seed(seed)
    while True:
        yield random_batch(g, **kw)


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_unselected_experts_stay_bit_identical_under_adamw_weight_decay():
    model = tiny_moe(sharp_router=True)
    access = ModularMoEAccess(model)
    before = snapshot(model)
    cfg = LocalTrainConfig(local_steps=4, lr=1e-3, weight_decay=0.1)
    result = train_local(model, endless(), expert_budget=L, cfg=cfg)
    after = model.state_dict()

    # exactly one expert per layer per batch
    assert (result.selection_counts.sum(dim=1) == cfg.local_steps).all()
    assert result.experts_trained_mean == L
    never = (result.selection_counts == 0).nonzero().tolist()
    assert never, "with budget = L and S = 4 some experts must stay unselected"
    for l, e in never:
        for name in access.expert_param_names(l, e):
            assert torch.equal(after[name], before[name]), f"unselected expert ({l},{e}) changed: {name}"
    for l, e in (result.selection_counts > 0).nonzero().tolist():
        names = access.expert_param_names(l, e)
        assert any(not torch.equal(after[n], before[n]) for n in names), f"selected expert ({l},{e}) did not change"
    for name in access.dense_param_names() + access.router_param_names():
        assert not torch.equal(after[name], before[name]), f"{name} did not change"
    assert torch.equal(result.trained, result.selection_counts > 0)


def test_optimizer_gives_fresh_parameters_the_larger_learning_rate():
    model = tiny_moe(sharp_router=True)
    access = ModularMoEAccess(model)
    cfg = LocalTrainConfig(lr=2e-4, new_param_lr_mult=10.0, weight_decay=0.05)
    opt = make_optimizer(model, access, cfg)
    pretrained, fresh = opt.param_groups
    assert pretrained["lr"] == pytest.approx(2e-4) and fresh["lr"] == pytest.approx(2e-3)
    assert pretrained["weight_decay"] == fresh["weight_decay"] == 0.05
    params = dict(model.named_parameters())
    fresh_ids = {id(p) for p in fresh["params"]}
    expected = set(access.router_param_names()) | {"classifier.weight", "classifier.bias"}
    assert fresh_ids == {id(params[n]) for n in expected}
    assert len(pretrained["params"]) + len(fresh["params"]) == len(params)


def test_fused_optimizer_makes_the_plain_adamw_update_and_skips_gradless_parameters():
    model = tiny_moe(sharp_router=True)
    access = ModularMoEAccess(model)
    cfg = LocalTrainConfig(lr=1e-3, weight_decay=0.1)
    opt = make_optimizer(model, access, cfg)
    assert all(group["fused"] for group in opt.param_groups)
    plain_model = copy.deepcopy(model)
    plain = torch.optim.AdamW([{"params": g["params"], "lr": g["lr"]} for g in make_optimizer(
        plain_model, ModularMoEAccess(plain_model), cfg).param_groups], weight_decay=cfg.weight_decay)
    params, plain_params = list(model.parameters()), list(plain_model.parameters())
    g = torch.Generator().manual_seed(0)
    for step in range(3):
        for i, (a, b) in enumerate(zip(params, plain_params)):
            if i % 3 == step % 3:  # some parameters get no gradient this step
                a.grad = b.grad = None
                continue
            grad = torch.randn(a.shape, generator=g)
            a.grad, b.grad = grad.clone(), grad.clone()
        opt.step()
        plain.step()
    for (name, a), b in zip(model.named_parameters(), plain_params):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)


def test_round_statistics(monkeypatch):
    """experts_trained_mean, usage (Eq. 16) and importance over a round."""
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    candidate_counts: list[int] = []
    pool, select = core.pool_token_scores, core.select_experts

    def spy_pool(token_scores, attention_mask=None, mode="mean"):
        seen.append((token_scores.clone(), attention_mask.clone()))
        return pool(token_scores, attention_mask, mode=mode)

    def spy_select(scores, candidates, budget):
        candidate_counts.append(int(candidates.sum()))
        return select(scores, candidates, budget)

    monkeypatch.setattr(core, "pool_token_scores", spy_pool)
    monkeypatch.setattr(core, "select_experts", spy_select)

    budget = 5
    cfg = LocalTrainConfig(local_steps=3, lr=1e-3)
    model = tiny_moe(sharp_router=True)
    result = train_local(model, endless(seed=3, b=8, t=12), expert_budget=budget, cfg=cfg)

    assert len(candidate_counts) == cfg.local_steps
    expected_mean = sum(min(budget, c) for c in candidate_counts) / cfg.local_steps
    assert result.experts_trained_mean == pytest.approx(expected_mean)
    assert result.experts_trained_mean <= budget
    # 8 samples x 12 tokens with a random router: every expert receives tokens...
    assert candidate_counts == [L * S] * cfg.local_steps
    # ... so every batch trains exactly the budget
    assert result.experts_trained_mean == budget
    assert int(result.selection_counts.sum()) == round(expected_mean * cfg.local_steps)

    assert result.num_samples == 8 * cfg.local_steps and result.steps == cfg.local_steps
    assert result.usage.shape == (L, S) and result.importance.shape == (L, S)
    assert result.selection_counts.shape == (L, S)
    torch.testing.assert_close(result.usage.sum(dim=1), torch.ones(L), atol=1e-5, rtol=0)
    # usage = per-sample mean of the router probabilities over real tokens, averaged over samples
    total = torch.zeros(L, S, dtype=torch.float64)
    for probs, mask in seen:
        m = mask.double()[:, :, None, None]
        total += ((probs.double() * m).sum(1) / m.sum(1)).sum(0)
    torch.testing.assert_close(result.usage, (total / result.num_samples).float(), atol=1e-6, rtol=0)
    assert (result.importance > 0).all() and (result.importance <= 1).all()
    assert math.isfinite(result.train_loss) and result.train_loss > 0
    assert result.wall_s > 0 and result.peak_mem_bytes > 0


def test_budget_below_the_number_of_layers_is_refused():
    model = tiny_moe(sharp_router=True)
    before = snapshot(model)
    with pytest.raises(ValueError, match=f"minimum budget is {L}"):
        train_local(model, endless(), expert_budget=L - 1, cfg=LocalTrainConfig(local_steps=1))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_evaluate_accuracy_and_loss():
    model = tiny_moe(sharp_router=True)
    g = torch.Generator().manual_seed(5)
    batches = [random_batch(g, b=5) for _ in range(3)]
    model.train()  # evaluate must switch dropout off itself
    scores = evaluate(model, batches)
    assert model.training is False
    assert 0.0 <= scores["accuracy"] <= 1.0
    assert scores["num_examples"] == 15
    with torch.no_grad():
        logits = torch.cat([model(b["input_ids"], b["attention_mask"]) for b in batches])
    labels = torch.cat([b["labels"] for b in batches])
    assert scores["accuracy"] == pytest.approx((logits.argmax(-1) == labels).float().mean().item())
    assert scores["loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, labels).item(), rel=1e-5)
    assert evaluate(model, batches, max_batches=1)["num_examples"] == 5


def test_evaluate_refuses_empty_batches():
    with pytest.raises(ValueError, match="no batches"):
        evaluate(tiny_moe(sharp_router=True), [])


def test_a_round_that_runs_out_of_memory_leaves_no_gradients_behind():
    """An out-of-memory error mid-backward (a client over its GPU cap) must not leave
    gradients on the parameters: they would stay resident and be added to the next
    round's first backward (the model object serves client after client)."""
    model = tiny_moe(sharp_router=True)
    reference = copy.deepcopy(model)
    cfg = LocalTrainConfig(local_steps=3, lr=1e-3)
    calls = {"n": 0}

    def out_of_memory(_param):
        calls["n"] += 1
        if calls["n"] == 2:  # the second step's backward, after other gradients accumulated
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    embeddings = model.backbone.embeddings.word_embeddings.weight  # its gradient accumulates last
    handle = embeddings.register_post_accumulate_grad_hook(out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):
        train_local(model, endless(), expert_budget=L * S, cfg=cfg)
    handle.remove()
    assert [n for n, p in model.named_parameters() if p.grad is not None] == []

    # the next round on the same model object trains as on a clean one
    model.load_state_dict(reference.state_dict())
    torch.manual_seed(0)
    after_failure = train_local(model, endless(seed=1), expert_budget=L * S, cfg=cfg)
    torch.manual_seed(0)
    clean = train_local(reference, endless(seed=1), expert_budget=L * S, cfg=cfg)
    assert after_failure.train_loss == clean.train_loss
    for (name, a), b in zip(model.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(a, b), name
