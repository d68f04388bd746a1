"""Routing records shared by the Hugging Face access families (fused, LoRA, Switch).

Each MoE block's routing in the last forward pass is a :class:`LayerRecord`, filled by
forward hooks on the block and its router. Hooks are module-level functions and their
state lives in the weak registry :data:`RECORDS` keyed by module, not in closures over
an access object: ``make_access()`` is called every round on the same long-lived model,
and per-access closures would pile up one hook set per call. Registration is idempotent
(checked by function identity with :func:`has_hook`), and a deep copy of the model
carries hooks that look up the COPY's modules, never the original's records.

G_e (what ``router_probs()`` returns) is the router's own score function applied to the
logits the router returned, over ALL experts (see :func:`score_function` and the
docstring of :mod:`hfedmoe.moe.fused`); dispatch is built from the router's returned
top-k indices, never recomputed.

``routing_override`` (routing masks, per-client top-k) re-runs each router's own rule
with the mask and top-k applied inside it: one pure function per family below
(:func:`mixtral_routing`, :func:`softmax_topk_routing`, :func:`deepseek_v2_routing`,
:func:`deepseek_v3_routing`, :func:`switch_routing`), called by a forward hook on the
router (:class:`RoutingOverrideHook`) that runs before :func:`router_hook`, so the
records above are those of the overridden routing.
"""

from __future__ import annotations

import math
import weakref

import torch
from torch import nn


class LayerRecord:
    """Routing of one MoE block in its last forward pass."""

    def __init__(self, score_fn: str, num_experts: int):
        self.score_fn = score_fn
        self.num_experts = num_experts
        self.tokens_shape: tuple[int, ...] | None = None  # [B, T] from the block's input
        self.probs: torch.Tensor | None = None  # Tensor[B, T, S], float32, detached
        self.dispatch: torch.Tensor | None = None  # BoolTensor[B, T, S]


RECORDS: "weakref.WeakKeyDictionary[nn.Module, LayerRecord]" = weakref.WeakKeyDictionary()


def has_hook(hooks: dict, fn) -> bool:
    """True when ``fn`` itself is among a module's (or tensor's) registered ``hooks``."""
    return any(h is fn for h in hooks.values())


def block_pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
    """Record the block input's token shape: routers see flattened [B*T, H] states."""
    record = RECORDS.get(module)
    hidden = args[0] if args else kwargs.get("hidden_states")
    if record is not None and isinstance(hidden, torch.Tensor):
        record.tokens_shape = tuple(hidden.shape[:-1])


def router_hook(module: nn.Module, args: tuple, output) -> None:
    """Record G_e and the top-k dispatch from a fused-layout router's own outputs."""
    record = RECORDS.get(module)
    if record is None:
        return
    logits, indices = parse_router_output(module, output, record.num_experts)
    num_tokens = logits.numel() // record.num_experts
    shape = record.tokens_shape
    if shape is None or math.prod(shape) != num_tokens:
        shape = (num_tokens,)  # router called outside its block: router_probs() will refuse
    with torch.no_grad():
        logits = logits.detach().reshape(num_tokens, record.num_experts).float()
        probs = torch.softmax(logits, dim=-1) if record.score_fn == "softmax" else torch.sigmoid(logits)
        record.probs = probs.reshape(*shape, record.num_experts)
        record.dispatch = dispatch_mask(indices.reshape(num_tokens, -1), record.num_experts).reshape(
            *shape, record.num_experts
        )


def parse_router_output(router: nn.Module, output, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [.., E], top-k indices [.., k]) out of the router's returned tuple."""
    items = output if isinstance(output, (tuple, list)) else (output,)
    logits = next((t for t in items if isinstance(t, torch.Tensor) and t.is_floating_point()
                   and t.dim() >= 1 and t.shape[-1] == num_experts), None)
    indices = next((t for t in items if isinstance(t, torch.Tensor) and not t.is_floating_point()
                    and t.dtype != torch.bool), None)
    if logits is None or indices is None:
        raise RuntimeError(
            f"{type(router).__name__} returned {type(output).__name__} without router logits [.., {num_experts}] "
            "and integer top-k indices; hfedmoe expects (router_logits, top_k_weights, top_k_index)"
        )
    return logits, indices


def dispatch_mask(indices: torch.Tensor, num_experts: int) -> torch.Tensor:
    """BoolTensor[N, E] from top-k indices [N, k]; out-of-range indices (the sentinel
    E used for dropped or remote tokens under expert parallelism) dispatch nowhere."""
    indices = indices.long()
    indices = torch.where((indices < 0) | (indices >= num_experts), num_experts, indices)
    mask = torch.zeros(indices.shape[0], num_experts + 1, dtype=torch.bool, device=indices.device)
    return mask.scatter_(1, indices, True)[:, :num_experts]


def score_function(router: nn.Module, config) -> str:
    """The router's score function: "softmax" or "sigmoid" (see :mod:`hfedmoe.moe.fused`)."""
    declared = None
    for cfg in (config, getattr(config, "text_config", None)):
        declared = declared or getattr(cfg, "scoring_func", None)
    if declared is not None:
        if declared not in ("softmax", "sigmoid"):
            raise NotImplementedError(f"router scoring function {declared!r} is not supported (softmax, sigmoid)")
        return declared
    if getattr(router, "e_score_correction_bias", None) is not None:
        return "sigmoid"
    return "softmax"


def register_block_routing(block: nn.Module, router: nn.Module, config, num_experts: int) -> LayerRecord:
    """The block's shared routing record; hooks (:func:`block_pre_hook` on the block,
    :func:`router_hook` on its router) registered on first use only."""
    record = RECORDS.get(router)
    if record is None:
        record = LayerRecord(score_function(router, config), num_experts)
        RECORDS[router] = record
        RECORDS[block] = record
    if not has_hook(block._forward_pre_hooks, block_pre_hook):
        block.register_forward_pre_hook(block_pre_hook, with_kwargs=True)
    if not has_hook(router._forward_hooks, router_hook):
        router.register_forward_hook(router_hook)
    return record


# --- routing rules: what routing_override recomputes inside each router ------------------
#
# A transformers 5.x router computes its logits and its top-k in one forward, so a routing
# mask cannot be applied to its output: routing_override re-runs the router's own rule on
# the logits it returned, with the mask and the top-k applied INSIDE the rule. Each rule
# below is one family's router forward, op for op (so that, without a mask and at the
# model's k, it returns the router's very tensors), plus two things the router never
# does: ``keep`` (BoolTensor[E], None = all experts) removes experts (logit -inf: softmax
# probability 0, sigmoid score 0, never chosen), and ``top_k`` may differ from the model's
# (larger included). Callers pass top_k <= the number of kept experts (see
# :func:`routed_count`), so no removed expert is ever chosen. Every rule returns
# (top-k weights [N, k], top-k indices [N, k]) from logits [N, E].

NEG_INF = float("-inf")


def routed_count(keep: torch.Tensor | None, top_k: int, num_experts: int) -> int:
    """Experts a token can be routed to under ``keep``: ``top_k``, at most the kept ones."""
    return min(top_k, num_experts if keep is None else int(keep.sum()))


def masked_logits(logits: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """``logits`` with -inf at the removed experts (the same tensor when ``keep`` is None)."""
    return logits if keep is None else logits.masked_fill(~keep, NEG_INF)


def _choice(scores: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """Scores top-k chooses from: removed experts at -inf, so they lose even to a kept
    expert whose probability underflowed to 0."""
    return scores if keep is None else scores.masked_fill(~keep, NEG_INF)


def mixtral_routing(logits: torch.Tensor, keep: torch.Tensor | None, top_k: int):
    """Mixtral (``MixtralTopKRouter``): softmax in float32, top-k, the k weights always
    renormalised to sum to one; weights float32."""
    probs = torch.nn.functional.softmax(masked_logits(logits, keep).float(), dim=-1)
    top, indices = torch.topk(_choice(probs, keep), top_k, dim=-1)
    return top / top.sum(dim=-1, keepdim=True), indices


def softmax_topk_routing(logits: torch.Tensor, keep: torch.Tensor | None, top_k: int, norm_topk_prob: bool):
    """Qwen2-MoE, Qwen3-MoE, OLMoE (``*TopKRouter`` with ``norm_topk_prob``): softmax in
    float32, top-k, renormalised only when ``norm_topk_prob``; weights in the logits' dtype.
    Under a mask the softmax runs over the kept experts only."""
    probs = torch.nn.functional.softmax(masked_logits(logits, keep), dtype=torch.float, dim=-1)
    top, indices = torch.topk(_choice(probs, keep), top_k, dim=-1)
    if norm_topk_prob:
        top = top / top.sum(dim=-1, keepdim=True)
    return top.to(logits.dtype), indices


def kept_per_group(keep: torch.Tensor | None, num_experts: int, n_group: int, device) -> torch.Tensor:
    """LongTensor[G]: kept experts in each of the ``n_group`` contiguous expert groups."""
    if keep is None:
        return torch.full((n_group,), num_experts // n_group, dtype=torch.long, device=device)
    return keep.reshape(n_group, num_experts // n_group).sum(dim=-1)


def limited_groups(group_scores: torch.Tensor, kept: torch.Tensor, topk_group: int, top_k: int) -> torch.Tensor:
    """BoolTensor[N, G]: the groups a token's experts are chosen from (DeepSeek's group limit).

    The ``topk_group`` best-scoring groups, as the routers choose them, minus groups with
    no kept expert (``kept``: LongTensor[G], kept experts per group). Where those hold
    fewer than ``top_k`` kept experts (a mask, or a top-k beyond topk_group groups), the
    next best groups are added, in order of score, until they hold ``top_k``: no removed
    expert and no group without a kept expert is ever needed. Without either, the result
    is the routers' own group mask.
    """
    group_idx = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False)[1]
    chosen = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, group_idx, True)
    has_kept = (kept > 0).expand_as(chosen)
    chosen = chosen & has_kept
    kept = kept.expand_as(chosen)
    short = (kept * chosen).sum(dim=-1) < top_k  # [N]
    # chosen groups first, then the others by score; take groups until top_k kept experts
    order = group_scores.masked_fill(chosen, float("inf")).argsort(dim=-1, descending=True, stable=True)
    in_order = kept.gather(1, order)
    taken = (in_order.cumsum(dim=-1) - in_order) < top_k
    extended = torch.zeros_like(chosen).scatter_(1, order, taken) & has_kept
    return torch.where(short[:, None], extended, chosen)


def _group_mask(groups: torch.Tensor, num_experts: int) -> torch.Tensor:
    """BoolTensor[N, E]: experts inside the chosen groups [N, G]."""
    n_group = groups.shape[-1]
    return groups.unsqueeze(-1).expand(-1, n_group, num_experts // n_group).reshape(-1, num_experts)


def deepseek_v2_routing(logits: torch.Tensor, keep: torch.Tensor | None, top_k: int, topk_method: str,
                        n_group: int, topk_group: int, routed_scaling_factor: float):
    """DeepSeek-V2 (``DeepseekV2TopkRouter``): softmax in float32; ``greedy``: top-k over all
    experts; ``group_limited_greedy``: groups scored by their best expert's probability,
    top-k within the ``topk_group`` best groups (:func:`limited_groups`); the weights are
    the probabilities (never renormalised) times ``routed_scaling_factor``."""
    num_experts = logits.shape[-1]
    scores = masked_logits(logits, keep).softmax(dim=-1, dtype=torch.float32)
    if topk_method == "greedy":
        top, indices = torch.topk(_choice(scores, keep), k=top_k, dim=-1, sorted=False)
    elif topk_method == "group_limited_greedy":
        group_scores = _choice(scores, keep).view(-1, n_group, num_experts // n_group).max(dim=-1).values
        kept = kept_per_group(keep, num_experts, n_group, logits.device)
        inside = _group_mask(limited_groups(group_scores, kept, topk_group, top_k), num_experts)
        top, indices = torch.topk(_choice(scores.masked_fill(~inside, 0.0), keep), k=top_k, dim=-1, sorted=False)
    else:
        raise NotImplementedError(f"DeepSeek-V2 topk_method {topk_method!r} (greedy, group_limited_greedy)")
    return top * routed_scaling_factor, indices


def deepseek_v3_routing(logits: torch.Tensor, keep: torch.Tensor | None, top_k: int, bias: torch.Tensor,
                        n_group: int, topk_group: int, norm_topk_prob: bool, routed_scaling_factor: float):
    """DeepSeek-V3 (``DeepseekV3TopkRouter``; GLM-4-MoE's router is the same): sigmoid
    scores; the ``e_score_correction_bias`` is added for the choice only; groups scored by
    the sum of their two best biased scores (under a mask: of their at most two best KEPT
    experts; a group with none is never chosen); top-k of the biased scores within the
    ``topk_group`` best groups (:func:`limited_groups`); weights are the UNBIASED scores
    of the chosen experts, renormalised when ``norm_topk_prob``, times
    ``routed_scaling_factor``."""
    num_experts = logits.shape[-1]
    scores = masked_logits(logits, keep).sigmoid()
    choice = _choice(scores + bias, keep)
    top2 = choice.view(-1, n_group, num_experts // n_group).topk(2, dim=-1)[0]
    kept = kept_per_group(keep, num_experts, n_group, logits.device)
    if keep is not None:  # a removed expert adds nothing to its group's score
        top2 = top2.masked_fill(top2 == NEG_INF, 0.0)
    group_scores = top2.sum(dim=-1)
    if keep is not None:
        group_scores = group_scores.masked_fill(kept == 0, NEG_INF)
    inside = _group_mask(limited_groups(group_scores, kept, topk_group, top_k), num_experts)
    indices = torch.topk(choice.masked_fill(~inside, NEG_INF), k=top_k, dim=-1, sorted=False)[1]
    weights = scores.gather(1, indices)
    if norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * routed_scaling_factor, indices


def switch_routing(logits: torch.Tensor, keep: torch.Tensor | None, top_k: int, expert_capacity: int,
                   router_dtype: torch.dtype, input_dtype: torch.dtype):
    """Switch Transformers (``SwitchTransformersTop1Router``), on logits [B, T, E]: softmax
    in ``router_dtype`` cast back to ``input_dtype``; each token to its best expert
    (argmax; the ``top_k`` best when top_k > 1); an expert takes at most
    ``expert_capacity`` tokens per sequence, in token order (the others are dropped from
    it); each chosen expert is weighted by its probability (never renormalised).

    Returns (expert_index [B, T, E] 0/1 int64 after the capacity cut, per-slot dispatch
    [B, T, k, E] after the cut, per-slot weights [B, T, k]).
    """
    num_experts = logits.shape[-1]
    probs = torch.nn.functional.softmax(masked_logits(logits, keep), dim=-1, dtype=router_dtype).to(input_dtype)
    choice = _choice(probs, keep)
    if top_k == 1:
        indices = torch.argmax(choice, dim=-1, keepdim=True)
    else:
        indices = torch.topk(choice, top_k, dim=-1).indices
    slots = torch.nn.functional.one_hot(indices, num_classes=num_experts)  # [B, T, k, E]
    hot = slots.sum(dim=-2)
    within = torch.cumsum(hot, dim=-2) <= expert_capacity
    return hot * within, slots * within.unsqueeze(-2), probs.gather(-1, indices)


class RoutingRule:
    """One fused router's routing rule, bound to the router (attributes read at each call,
    so loaded buffers such as ``e_score_correction_bias`` are current)."""

    def __init__(self, name: str, router: nn.Module, renormalizes: bool):
        self.name = name
        self.router = router
        self.renormalizes = renormalizes

    def __call__(self, logits: torch.Tensor, keep: torch.Tensor | None, top_k: int):
        r = self.router
        if self.name == "deepseek_v3":
            return deepseek_v3_routing(logits, keep, top_k, r.e_score_correction_bias, r.num_group, r.topk_group,
                                       bool(r.norm_topk_prob), r.routed_scaling_factor)
        if self.name == "deepseek_v2":
            return deepseek_v2_routing(logits, keep, top_k, r.topk_method, r.num_group, r.topk_group,
                                       r.routed_scaling_factor)
        if self.name == "softmax_topk":
            return softmax_topk_routing(logits, keep, top_k, bool(r.norm_topk_prob))
        return mixtral_routing(logits, keep, top_k)


def fused_routing_rule(router: nn.Module) -> RoutingRule:
    """The rule of a fused-layout router, from its structure: an ``e_score_correction_bias``
    with groups -> DeepSeek-V3; a ``topk_method`` -> DeepSeek-V2; a ``norm_topk_prob`` ->
    Qwen2/Qwen3-MoE/OLMoE; otherwise Mixtral. :class:`RoutingOverrideHook` checks, on the
    first forward, that the rule reproduces the router's own routing, and refuses a router
    it does not (another family's rule)."""
    if getattr(router, "e_score_correction_bias", None) is not None and hasattr(router, "num_group"):
        return RoutingRule("deepseek_v3", router, bool(getattr(router, "norm_topk_prob", False)))
    if hasattr(router, "topk_method"):
        return RoutingRule("deepseek_v2", router, False)
    if hasattr(router, "norm_topk_prob"):
        return RoutingRule("softmax_topk", router, bool(router.norm_topk_prob))
    return RoutingRule("mixtral", router, True)


def router_output_positions(output, num_experts: int) -> tuple[int, int, int]:
    """Positions of (logits [.., E], top-k weights, top-k indices) in a fused router's
    output tuple (the weights: the floating tensor shaped like the indices)."""
    items = list(output) if isinstance(output, (tuple, list)) else [output]
    tensors = [(i, t) for i, t in enumerate(items) if isinstance(t, torch.Tensor)]
    logits = [i for i, t in tensors if t.is_floating_point() and t.dim() >= 1 and t.shape[-1] == num_experts]
    indices = [i for i, t in tensors if not t.is_floating_point() and t.dtype != torch.bool]
    if len(items) == 3 and len(logits) == 1 and len(indices) == 1:
        shape = items[indices[0]].shape
        weights = [i for i, t in tensors if t.is_floating_point() and i != logits[0] and t.shape == shape]
        if len(weights) == 1:
            return logits[0], weights[0], indices[0]
    raise RuntimeError(f"a router returned {type(output).__name__}: routing_override expects "
                       f"(router_logits [.., {num_experts}], top_k_weights, top_k_index)")


def same_routing(weights: torch.Tensor, indices: torch.Tensor, ref_weights: torch.Tensor,
                 ref_indices: torch.Tensor) -> bool:
    """Whether two top-k routings choose the same experts per token with the same weights
    (slot order aside)."""
    if weights.shape != ref_weights.shape or indices.shape != ref_indices.shape:
        return False
    order, ref_order = indices.argsort(dim=-1), ref_indices.argsort(dim=-1)
    if not torch.equal(indices.gather(-1, order).long(), ref_indices.gather(-1, ref_order).long()):
        return False
    return torch.allclose(weights.gather(-1, order).float(), ref_weights.gather(-1, ref_order).float(),
                          rtol=1e-5, atol=1e-7)


class RoutingOverrideHook:
    """Forward hook on a fused-layout router while ``routing_override`` is open.

    Takes the (logits, weights, indices) the router returned and returns them recomputed
    by the router's :class:`RoutingRule` with ``keep`` and ``top_k`` applied, in the
    router's own tuple layout and dtypes; the logits come back masked (-inf at removed
    experts), so the routing records (:func:`router_hook`) and the model's own
    router-logit outputs (``output_router_logits``) see the overridden routing. The
    masked logits, with gradient, go to ``capture.logits[index]``. Without a mask and at
    the model's k the router's output passes through untouched. Registered with
    ``prepend=True``: it runs before every other forward hook of the router.
    """

    def __init__(self, rule: RoutingRule, keep: torch.Tensor | None, top_k: int | None, capture, index: int,
                 num_experts: int):
        self.rule, self.keep, self.top_k = rule, keep, top_k
        self.capture, self.index, self.num_experts = capture, index, num_experts
        self.kept = routed_count(keep, num_experts, num_experts)  # once: no device sync per forward
        self.checked = False

    def __call__(self, module: nn.Module, args: tuple, output):
        positions = router_output_positions(output, self.num_experts)
        items = list(output)
        logits, weights, indices = (items[p] for p in positions)
        model_k = indices.shape[-1]
        k = min(self.top_k or model_k, self.kept)
        masked = masked_logits(logits, self.keep)
        self.capture.logits[self.index] = masked
        if self.keep is None and k == model_k:
            return None  # nothing to change: the router's own routing, bit for bit
        flat = logits.reshape(-1, self.num_experts)
        if not self.checked:
            with torch.no_grad():
                own = self.rule(flat.detach(), None, model_k)
            if not same_routing(*own, weights.reshape(-1, model_k), indices.reshape(-1, model_k)):
                raise RuntimeError(
                    f"{type(module).__name__}: hfedmoe's {self.rule.name} routing rule does not reproduce this "
                    "router's routing, so routing masks and per-client top-k are not supported for it "
                    "(supported: Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V2, DeepSeek-V3)")
            self.checked = True
        new_weights, new_indices = self.rule(flat, self.keep, k)
        items[positions[0]] = masked
        items[positions[1]] = new_weights.to(weights.dtype).reshape(*weights.shape[:-1], k)
        items[positions[2]] = new_indices.to(indices.dtype).reshape(*indices.shape[:-1], k)
        return type(output)(items)


def scale_output_hook(scales: torch.Tensor, index: int):
    """Forward hook multiplying a module's output by ``scales[index]`` (gradient reaches
    ``scales``): routed_output_scale on the experts module of each MoE layer."""
    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return output * scales[index].to(device=output.device, dtype=output.dtype)

    return hook
