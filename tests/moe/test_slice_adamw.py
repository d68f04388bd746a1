"""ExpertSliceAdamW: AdamW per expert slice of a fused tensor (hfedmoe.moe.slice_adamw)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hfedmoe.moe.slice_adamw import ExpertSliceAdamW

E = 4
HYPER = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)


def grad_at(step: int, shape) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(100 + step))


@pytest.mark.parametrize("fused", [False, True])
def test_each_slice_moves_like_its_own_adamw_parameter_and_unmasked_slices_do_not_move(fused):
    torch.manual_seed(0)
    fused_param = nn.Parameter(torch.randn(E, 3, 5))
    dense = nn.Parameter(torch.randn(6))
    opt = ExpertSliceAdamW([{"params": [fused_param, dense]}], fused=fused, **HYPER)
    # reference: every slice its own parameter; an unselected slice's AdamW state is
    # dropped (moments restart), which is what the trainer does for separate experts
    ref_slices = [nn.Parameter(fused_param.detach()[e].clone()) for e in range(E)]
    ref_opts: list[torch.optim.AdamW | None] = [None] * E
    ref_dense = nn.Parameter(dense.detach().clone())
    ref_dense_opt = torch.optim.AdamW([ref_dense], fused=fused, **HYPER)
    masks = [[1, 0, 1, 0], [1, 1, 0, 0], [0, 0, 0, 1], [1, 0, 1, 1], [1, 1, 1, 1]]
    for step, mask in enumerate(masks):
        mask = torch.tensor(mask, dtype=torch.bool)
        g = grad_at(step, fused_param.shape)
        before = fused_param.detach().clone()
        fused_param.grad, dense.grad = g.clone(), grad_at(50 + step, dense.shape)
        opt.slice_masks = {fused_param: mask}
        opt.step()
        ref_dense.grad = dense.grad.clone()
        ref_dense_opt.step()
        for e in range(E):
            if mask[e]:
                if ref_opts[e] is None:
                    ref_opts[e] = torch.optim.AdamW([ref_slices[e]], fused=fused, **HYPER)
                ref_slices[e].grad = g[e].clone()
                ref_opts[e].step()
                torch.testing.assert_close(fused_param.detach()[e], ref_slices[e].detach(), rtol=0, atol=1e-7)
            else:
                ref_opts[e] = None
                assert torch.equal(fused_param.detach()[e], before[e]), (step, e)  # bit for bit
        assert sorted(opt.state[fused_param]["slices"]) == mask.nonzero().flatten().tolist()
        torch.testing.assert_close(dense.detach(), ref_dense.detach(), rtol=0, atol=1e-7)


def test_without_masks_it_is_adamw():
    torch.manual_seed(0)
    a, b = nn.Parameter(torch.randn(E, 3)), nn.Parameter(torch.randn(E, 3))
    ref = [nn.Parameter(p.detach().clone()) for p in (a, b)]
    opt, ref_opt = ExpertSliceAdamW([a, b], **HYPER), torch.optim.AdamW(ref, **HYPER)
    for step in range(3):
        for p, r, k in ((a, ref[0], 0), (b, ref[1], 1)):
            p.grad = grad_at(10 * k + step, p.shape)
            r.grad = p.grad.clone()
        opt.step()
        ref_opt.step()
    assert torch.equal(a, ref[0]) and torch.equal(b, ref[1])


def test_all_slices_masked_equals_adamw_on_the_whole_tensor():
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(E, 3, 5))
    r = nn.Parameter(p.detach().clone())
    opt, ref_opt = ExpertSliceAdamW([p], **HYPER), torch.optim.AdamW([r], **HYPER)
    for step in range(3):
        p.grad = grad_at(step, p.shape)
        r.grad = p.grad.clone()
        opt.slice_masks = {p: torch.ones(E, dtype=torch.bool)}
        opt.step()
        ref_opt.step()
    torch.testing.assert_close(p.detach(), r.detach(), rtol=0, atol=1e-7)


def test_a_masked_tensor_without_gradient_is_skipped_and_amsgrad_is_refused():
    p = nn.Parameter(torch.randn(E, 2))
    before = p.detach().clone()
    opt = ExpertSliceAdamW([p], **HYPER)
    opt.slice_masks = {p: torch.ones(E, dtype=torch.bool)}
    opt.step()
    assert torch.equal(p, before)
    with pytest.raises(ValueError, match="amsgrad"):
        ExpertSliceAdamW([p], amsgrad=True)
