"""AdamW that updates, and keeps state for, only the selected expert slices of fused tensors.

A transformers 5.x MoE layer stores its experts as one 3-D parameter (``[E, ...]``,
expert index first). ``torch.optim.AdamW`` updates and keeps moments for a whole
tensor, so a client that trains 2 of 8 experts would (a) move the other 6 slices
(weight decay, momentum) unless they are snapshotted and restored, and (b) hold AdamW
moments for all 8, which makes a constrained client use MORE memory than an
unconstrained one (measured: see BENCHMARKS.md, fused-expert step).

:class:`ExpertSliceAdamW` is ``torch.optim.AdamW`` for every parameter, except that
for the tensors named in :attr:`ExpertSliceAdamW.slice_masks` (``param -> BoolTensor[E]``,
set for one step by the access layer) it

- updates only the slices whose mask is True, with the same AdamW update (the same
  ``torch.optim.adamw.adamw`` function, hyper-parameters of the parameter's group),
  as if each slice were a parameter of its own: its own step count (bias correction)
  and moments;
- holds moments only for those slices, and drops the moments of slices outside the
  mask after the step (an expert outside a batch's selection holds no optimizer
  state; its moments restart when it is selected again -- the same rule the trainer
  applies to separate experts).

Unmasked slices are never written: bit-for-bit unchanged by construction.
"""

from __future__ import annotations

import torch
from torch.optim.adamw import adamw as adamw_update


class ExpertSliceAdamW(torch.optim.AdamW):
    """``torch.optim.AdamW`` with per-expert slices for the tensors in :attr:`slice_masks`.

    Parameters
    ----------
    params, **kwargs
        As for ``torch.optim.AdamW`` (``amsgrad`` is not supported).
    """

    def __init__(self, params, **kwargs):
        if kwargs.get("amsgrad"):
            raise ValueError("ExpertSliceAdamW does not support amsgrad")
        super().__init__(params, **kwargs)
        self.slice_masks: dict[torch.Tensor, torch.Tensor] = {}

    @torch.no_grad()
    def step(self, closure=None):
        """One AdamW step: whole tensors as AdamW does, masked tensors slice by slice."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # keyed by id: tensors compare element-wise, so they make unsafe dict keys
        masked = {id(p): (p, m) for p, m in self.slice_masks.items() if p.grad is not None}
        # The parent updates every other tensor; hide the masked ones' gradients from it.
        grads = [(p, p.grad) for p, _ in masked.values()]
        for p, _ in grads:
            p.grad = None
        try:
            super().step()
        finally:
            for p, g in grads:
                p.grad = g
        for group in self.param_groups:
            in_group = [masked[id(p)] for p in group["params"] if id(p) in masked]
            if in_group:
                self._step_slices(group, in_group)
        return loss

    def _step_slices(self, group: dict, masked: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        fused = bool(group.get("fused"))
        views, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        for p, mask in masked:
            keep = mask.nonzero().flatten().tolist()
            old = self.state[p].get("slices", {})
            slices = {}
            for e in keep:
                state = old.get(e)
                if state is None:
                    state = {
                        # the fused CPU kernel wants float32 step tensors, like AdamW's own
                        "step": torch.zeros((), dtype=torch.float32, device=p.device),
                        "exp_avg": torch.zeros_like(p[e], memory_format=torch.preserve_format),
                        "exp_avg_sq": torch.zeros_like(p[e], memory_format=torch.preserve_format),
                    }
                slices[e] = state
                views.append(p.detach()[e])  # a view: the update writes into the fused tensor
                grads.append(p.grad[e])
                exp_avgs.append(state["exp_avg"])
                exp_avg_sqs.append(state["exp_avg_sq"])
                steps.append(state["step"])
            self.state[p]["slices"] = slices  # slices outside the mask lose their state
        if not views:
            return
        beta1, beta2 = group["betas"]
        adamw_update(
            views, grads, exp_avgs, exp_avg_sqs, [], steps,
            foreach=group.get("foreach"), capturable=False, differentiable=False, fused=fused,
            grad_scale=None, found_inf=None, has_complex=False,
            amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"],
            eps=group["eps"], maximize=group.get("maximize", False),
        )
