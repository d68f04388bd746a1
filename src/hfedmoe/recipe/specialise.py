"""The specialised starting point (``--model embedded-minilm-moe-specialised``): the embedded
upcycled MiniLM-MoE whose experts differ and whose routing differs by topic, trained once
on the public share of the embedded data (no client holds it, no test scores it) and cached.

Why it exists: upcycled experts all start as copies of one FFN and the router is new, so
routing says little and no expert-selection rule can beat another; the paper's premise
is a pretrained MoE whose experts differ and whose routing differs by a client's domain.

The recipe, Branch-Train-MiX style (Sukhbaatar et al. 2024) inside one model:

1. Branch: expert e of every MoE layer belongs to topic ``e mod C`` (C classes; see
   :func:`topic_masks` when there are fewer experts than topics). Each of
   :data:`BRANCH_STEPS` steps takes a batch of one topic's public examples, routes it
   only to that topic's experts (:meth:`~hfedmoe.moe.protocol.MoEAccess.routing_override`
   with a mask) and trains those experts and a temporary linear head; everything else
   stays as pretrained.
2. Mix: :data:`ROUTER_STEPS` steps on batches of every topic train the routers (and the
   temporary head) with the experts frozen, on the task loss plus a routing loss that
   asks each token to put its probability on its topic's experts (-log of the router
   probability mass on them, mean over layers and real tokens, weight
   :data:`ROUTING_LOSS_COEF`). Trained on the task loss alone (with the load-balancing
   loss), the routers collapsed onto two experts for every topic (measured: version 1 of
   this recipe); the routing loss is what makes routing differ by topic, as the paper
   assumes of a pretrained MoE.

The temporary head is discarded (a run's head starts from its own seed, as before); the
cache holds every expert and router tensor (safetensors) and the build's figures (JSON:
build time, and how each topic's tokens spread over the experts before and after).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F

from hfedmoe.data import tokenize_texts
from hfedmoe.models.upcycled import UpcycledSpec, build_upcycled_classifier, embedded_model_path
from hfedmoe.moe import MoEAccess, make_access
from hfedmoe.recipe.data import private_sample, public_examples
from hfedmoe.recipe.sources import tokenizer_for

VERSION = 3  # bump when the recipe changes: a new cache file
BRANCH_STEPS = 40
ROUTER_STEPS = 60
BATCH_SIZE = 16
MAX_LENGTH = 64
EXPERT_LR = 3e-4
ROUTER_LR = 3e-3
ROUTING_LOSS_COEF = 1.0
# The build's own seed, far from the run seeds people use (0, 1, 2, ...): with SEED = 0 the
# temporary head started where a seed-0 run's head starts, so a seed-0 run began at 85%
# accuracy before any federated round and other seeds did not (measured, version 2).
SEED = 1000


def cache_path(num_experts: int, top_k: int) -> Path:
    """Where the specialised experts and routers of this shape are cached."""
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "hfedmoe" / "specialised"
    return root / f"minilm-e{num_experts}-k{top_k}-v{VERSION}.safetensors"


def _stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def load_specialised(model: nn.Module, num_experts: int, top_k: int, log=_stderr) -> None:
    """Load the specialised experts and routers into the upcycled ``model`` (built with
    ``num_experts`` / ``top_k``), building and caching them on first use."""
    path = cache_path(num_experts, top_k)
    if not path.is_file():
        build_specialised(num_experts, top_k, path, log=log)
    state = load_file(str(path))
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise ValueError(f"{path} does not fit this model (unexpected {result.unexpected_keys[:3]}): delete it "
                         "to rebuild it")


def weights_digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 of the tensors' names and bytes, in name order (16 hex digits)."""
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def topic_masks(num_layers: int, num_experts: int, num_topics: int) -> list[torch.Tensor]:
    """Per topic t, BoolTensor[L, S]: its experts in every layer, those e with e mod C == t
    (with fewer experts than topics, S < C: expert t mod S, shared by several topics)."""
    if num_experts < num_topics:
        own = [torch.arange(num_experts) == t % num_experts for t in range(num_topics)]
    else:
        own = [torch.arange(num_experts) % num_topics == t for t in range(num_topics)]
    return [mask.expand(num_layers, num_experts).clone() for mask in own]


@torch.no_grad()
def topic_usage(access: MoEAccess, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor,
                num_topics: int, batch_size: int = 64) -> torch.Tensor:
    """Tensor[C, L, S]: per topic, the share of its real tokens dispatched to each expert."""
    model = access.model
    was_training = model.training
    model.eval()
    counts = torch.zeros(num_topics, access.num_layers, access.num_experts, dtype=torch.float64)
    tokens = torch.zeros(num_topics, dtype=torch.float64)
    for start in range(0, len(ids), batch_size):
        rows = slice(start, start + batch_size)
        model(ids[rows], mask[rows])
        real = mask[rows].bool()
        dispatch = access.dispatch() & real[:, :, None, None]  # [B, T, L, S]
        for topic in range(num_topics):
            of_topic = labels[rows] == topic
            counts[topic] += dispatch[of_topic].sum(dim=(0, 1)).double()
            tokens[topic] += real[of_topic].sum()
    model.train(was_training)
    return counts / tokens.clamp_min(1)[:, None, None]


def routing_loss(capture, masks: list[torch.Tensor], topics: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """-log of the router probability mass each token puts on its topic's experts, mean
    over layers and real tokens (with gradient into the routers)."""
    real = attention_mask.bool().reshape(-1)
    own = torch.stack(masks)[topics]  # [B, L, S]
    per_token = own[:, None].expand(-1, attention_mask.shape[1], -1, -1).reshape(real.numel(), *own.shape[1:])
    losses = []
    for layer, logits in enumerate(capture.logits):
        log_probs = torch.log_softmax(logits.float().reshape(real.numel(), -1), dim=-1)
        on_own = torch.logsumexp(log_probs.masked_fill(~per_token[:, layer], float("-inf")), dim=-1)
        losses.append(-on_own[real].mean())
    return torch.stack(losses).mean()


def own_expert_share(usage: torch.Tensor, masks: list[torch.Tensor], top_k: int) -> float:
    """Mean over topics and layers of the share of a topic's expert slots its own experts get."""
    shares = [(usage[t] * masks[t]).sum(dim=1) / top_k for t in range(len(masks))]  # each [L]
    return float(torch.stack(shares).mean())


def build_specialised(num_experts: int, top_k: int, path: Path, branch_steps: int = BRANCH_STEPS,
                      router_steps: int = ROUTER_STEPS, batch_size: int = BATCH_SIZE,
                      max_length: int = MAX_LENGTH, log=_stderr) -> dict:
    """Train the specialised experts and routers (module docstring) and cache them at ``path``.

    Returns the build's figures (also written next to it as JSON).
    """
    started = time.perf_counter()
    log(f"hfedmoe: specialising the embedded model's experts ({num_experts} per layer, top-{top_k}) on the "
        f"public share of the embedded data, once; cached in {path}")
    data = public_examples()
    num_topics = len(data.label_names)
    base = embedded_model_path()
    spec = UpcycledSpec(base_path=str(base), num_labels=num_topics, num_experts=num_experts, top_k=top_k)
    model = build_upcycled_classifier(spec, pretrained=True, seed=SEED).train()
    access = make_access(model)
    encoded = tokenize_texts(tokenizer_for(str(base)), data.texts, max_length=max_length)
    ids, mask = encoded["input_ids"], encoded["attention_mask"]
    labels = torch.tensor(data.labels)
    masks = topic_masks(access.num_layers, access.num_experts, num_topics)
    before = topic_usage(access, ids, mask, labels, num_topics)
    generator = torch.Generator().manual_seed(SEED)
    groups = access.param_groups()
    params = dict(model.named_parameters())
    expert_params = [params[n] for n in groups.all_expert_keys]
    router_params = [params[n] for n in groups.routers]
    head = list(model.classifier.parameters())
    for p in model.parameters():
        p.requires_grad_(False)

    # 1. Branch: one topic per batch, routed to that topic's experts only.
    for p in expert_params + head:
        p.requires_grad_(True)
    # no weight decay: an expert a batch does not reach must not move
    optimizer = torch.optim.AdamW(expert_params + head, lr=EXPERT_LR, weight_decay=0.0)
    of_topic = [torch.nonzero(labels == t).flatten() for t in range(num_topics)]
    for step in range(branch_steps):
        topic = step % num_topics
        pick = of_topic[topic][torch.randperm(len(of_topic[topic]), generator=generator)[:batch_size]]
        with access.routing_override(mask=masks[topic]):
            loss = F.cross_entropy(model(ids[pick], mask[pick]), labels[pick])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % 20 == 0 or step + 1 == branch_steps:
            log(f"  branch step {step + 1}/{branch_steps}: loss {loss.item():.3f}")

    # 2. Mix: experts frozen, routers (and the temporary head) learn to route.
    for p in expert_params:
        p.requires_grad_(False)
    for p in router_params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(router_params + head, lr=ROUTER_LR, weight_decay=0.0)
    for step in range(router_steps):
        pick = torch.randperm(len(labels), generator=generator)[:batch_size]
        with access.routing_override() as capture:  # the router logits, with gradient
            logits = model(ids[pick], mask[pick])
            loss = F.cross_entropy(logits, labels[pick]) + ROUTING_LOSS_COEF * routing_loss(
                capture, masks, labels[pick], mask[pick])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % 20 == 0 or step + 1 == router_steps:
            log(f"  router step {step + 1}/{router_steps}: loss {loss.item():.3f}")
    for p in model.parameters():
        p.requires_grad_(True)

    after = topic_usage(access, ids, mask, labels, num_topics)
    # The same on examples the build never saw (the clients' side of the data), to show the
    # routing generalises: measured only, nothing is trained on them.
    unseen = private_sample(len(labels))
    unseen_enc = tokenize_texts(tokenizer_for(str(base)), unseen.texts, max_length=max_length)
    after_unseen = topic_usage(access, unseen_enc["input_ids"], unseen_enc["attention_mask"],
                               torch.tensor(unseen.labels), num_topics)
    state = {n: params[n].detach().contiguous() for n in [*groups.all_expert_keys, *groups.routers]}
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + f".{os.getpid()}.tmp")
    save_file(state, str(partial))
    os.replace(partial, path)  # atomic: a concurrent reader sees no half-written file
    figures = {
        # The build is seeded but not bit-reproducible across machines (CPU kernels differ in
        # their float rounding, and 100 training steps amplify it): the digest tells two builds apart.
        "weights_sha256": weights_digest(state),
        "version": VERSION, "num_experts": num_experts, "top_k": top_k, "public_examples": len(labels),
        "branch_steps": branch_steps, "router_steps": router_steps, "batch_size": batch_size,
        "max_length": max_length, "build_s": round(time.perf_counter() - started, 1),
        "topics": list(data.label_names),
        # share of a topic's expert slots that go to its own experts (uniform routing: |own| / S)
        "own_expert_share_before": round(own_expert_share(before, masks, top_k), 4),
        "own_expert_share_after": round(own_expert_share(after, masks, top_k), 4),
        "own_expert_share_after_unseen": round(own_expert_share(after_unseen, masks, top_k), 4),
        "usage_before": before.tolist(), "usage_after": after.tolist(),
    }
    path.with_suffix(".json").write_text(json.dumps(figures, indent=1))
    log(f"  done in {figures['build_s']} s: a topic's own experts take {figures['own_expert_share_after']:.0%} "
        f"of its expert slots ({figures['own_expert_share_after_unseen']:.0%} on unseen examples; before: "
        f"{figures['own_expert_share_before']:.0%})")
    return figures
