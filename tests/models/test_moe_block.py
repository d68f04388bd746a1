"""The MoE feed-forward block (hfedmoe.models.moe_block.MoEFeedForward): routing records and output."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from hfedmoe.models.moe_block import MoEFeedForward

from builders import K, S


# --- MoEFeedForward ---------------------------------------------------------------------

def test_moe_feedforward_records_and_output():
    torch.manual_seed(0)
    moe = MoEFeedForward(hidden_size=16, intermediate_size=32, num_experts=S, top_k=K)
    # Make the experts different so the output depends on the routing.
    with torch.no_grad():
        for e, expert in enumerate(moe.experts):
            expert.fc2.bias.fill_(float(e))
        moe.router.weight.normal_(0.0, 1.0)
    x = torch.randn(3, 5, 16)
    y = moe(x)

    probs, dispatch = moe.last_router_probs, moe.last_dispatch
    assert probs.shape == (3, 5, S) and dispatch.shape == (3, 5, S)
    assert dispatch.dtype == torch.bool
    torch.testing.assert_close(probs.sum(-1), torch.ones(3, 5), atol=1e-6, rtol=0)
    torch.testing.assert_close(probs, F.softmax(moe.router(x), dim=-1).detach())
    assert not probs.requires_grad
    assert (dispatch.sum(-1) == K).all()
    # dispatch marks exactly each token's top-k experts
    top_idx = probs.topk(K, dim=-1).indices
    assert torch.equal(dispatch, torch.zeros_like(dispatch).scatter_(-1, top_idx, True))

    # output = sum over the top-k of renormalised probability * expert(x)
    expected = torch.zeros_like(x)
    top_p = probs.gather(-1, top_idx)
    top_p = top_p / top_p.sum(-1, keepdim=True)
    for k in range(K):
        for e in range(S):
            sel = top_idx[..., k] == e
            expected[sel] += top_p[..., k][sel].unsqueeze(-1) * moe.experts[e](x[sel])
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)

    aux = moe.last_aux_loss
    assert aux.ndim == 0 and torch.isfinite(aux)
    assert aux.requires_grad
    flat_p = F.softmax(moe.router(x.reshape(-1, 16)), dim=-1)
    fraction = dispatch.reshape(-1, S).float().mean(0) / K
    torch.testing.assert_close(aux, S * (fraction * flat_p.mean(0)).sum())
    aux.backward()
    assert moe.router.weight.grad is not None and moe.router.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("top_k", [0, S + 1])
def test_moe_feedforward_rejects_invalid_top_k(top_k):
    with pytest.raises(ValueError, match="top_k"):
        MoEFeedForward(16, 32, num_experts=S, top_k=top_k)
