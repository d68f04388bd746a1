"""Tiny models, inputs and data files shared by the test folders (not a test module).

Imported by name (``from builders import tiny_moe``): tests/conftest.py lives in
tests/, and pytest's default ``prepend`` import mode puts that folder on sys.path.
Fixtures (arguments of a test) are in tests/conftest.py.

Three groups:

- the tiny upcycled BERT (2 MoE layers x 4 experts, top-2): ``tiny_bert``, ``tiny_moe``, ``batch``;
- tiny random configs of the transformers 5.x fused-expert families: ``FAMILIES``, ``tiny_config``, ``inputs``;
- Hugging Face checkpoints on disk and one in-process federated round: ``save_family``,
  ``write_data``, ``one_round_parties``, ``one_round_replies``, ``one_round``.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers

from hfedmoe.client_round import client_round
from hfedmoe.config import RunConfig
from hfedmoe.data import load_bbc_news
from hfedmoe.fl.records import ReceivedUpload
from hfedmoe.fl.strategy import HFedMoE
from hfedmoe.models.upcycled import MoEClassifier, upcycle_bert_layers
from hfedmoe.moe import make_access
from hfedmoe.moe.modular import ModularMoEAccess
from hfedmoe.recipe import build_model, load_client_data

# --- the tiny upcycled BERT ------------------------------------------------------------------

L, S, K = 2, 4, 2  # MoE layers, experts per layer, top-k of the tiny model
VOCAB, LABELS = 100, 3  # its vocabulary and number of classes


def tiny_bert(seed: int = 0, **config_kwargs) -> transformers.BertModel:
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=L, num_attention_heads=2, intermediate_size=32,
        **config_kwargs,
    )
    torch.manual_seed(seed)
    return transformers.BertModel(config, add_pooling_layer=False)


def tiny_moe(num_experts: int = S, top_k: int = K, seed: int = 0, *, sharp_router: bool = False) -> MoEClassifier:
    """A tiny BERT upcycled to MoE with a 3-class head.

    ``sharp_router=True`` redraws every router from N(0, 0.5), sharper than the
    near-uniform init, so routing (and selection) differs between experts: what the
    method and training tests use.
    """
    backbone = tiny_bert(seed)
    upcycle_bert_layers(backbone, num_experts=num_experts, top_k=top_k, seed=seed)
    model = MoEClassifier(backbone, num_labels=LABELS)
    if sharp_router:
        with torch.no_grad():
            for layer in ModularMoEAccess(model).layers:
                layer.router.weight.normal_(0.0, 0.5)
    return model


def batch(b: int = 3, t: int = 8, vocab: int = VOCAB, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.long)
    mask[0, t - 3:] = 0  # some padding
    return ids, mask


# --- tiny configs of the fused-expert families (transformers 5.x) ------------------------------

B, T = 2, 5
COMMON = dict(
    vocab_size=100, hidden_size=32, num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
    pad_token_id=0, bos_token_id=1, eos_token_id=2,
)
DEEPSEEK = dict(
    intermediate_size=16, num_hidden_layers=3, first_k_dense_replace=1, n_routed_experts=8, num_experts_per_tok=2,
    moe_intermediate_size=8, n_shared_experts=1, kv_lora_rank=8, q_lora_rank=8, qk_nope_head_dim=8,
    qk_rope_head_dim=8, v_head_dim=8, n_group=4, topk_group=2,
)


@dataclass
class Family:
    """A tiny config and what the test independently expects of it."""

    model_type: str
    config: dict
    moe_layers: list[int]  # decoder layers that are MoE (the others are dense)
    num_experts: int
    score: str  # the router's score function, read from the family's modeling code
    top_k: int = 2
    extra: dict = field(default_factory=dict)


FAMILIES = {
    "mixtral": Family("mixtral", dict(intermediate_size=16, num_hidden_layers=2, num_local_experts=4,
                                      num_experts_per_tok=2), [0, 1], 4, "softmax"),
    # mlp_only_layers=[0]: layer 0 is a dense MLP and must not count
    "qwen2_moe": Family("qwen2_moe", dict(intermediate_size=16, num_hidden_layers=3, num_experts=4,
                                          num_experts_per_tok=2, moe_intermediate_size=8,
                                          shared_expert_intermediate_size=16, mlp_only_layers=[0]), [1, 2], 4,
                        "softmax"),
    # decoder_sparse_step=2: MoE in layers 1 and 3 only
    "qwen3_moe": Family("qwen3_moe", dict(intermediate_size=16, num_hidden_layers=4, num_experts=6,
                                          num_experts_per_tok=2, moe_intermediate_size=8, head_dim=16,
                                          decoder_sparse_step=2, norm_topk_prob=True), [1, 3], 6, "softmax"),
    "olmoe": Family("olmoe", dict(intermediate_size=16, num_hidden_layers=2, num_experts=4, num_experts_per_tok=2),
                    [0, 1], 4, "softmax"),
    "deepseek_v2": Family("deepseek_v2", dict(DEEPSEEK, topk_method="group_limited_greedy", routed_scaling_factor=1.5),
                          [1, 2], 8, "softmax"),
    "deepseek_v3": Family("deepseek_v3", dict(DEEPSEEK, routed_scaling_factor=2.5), [1, 2], 8, "sigmoid"),
}


def tiny_config(family: Family) -> transformers.PretrainedConfig:
    return transformers.AutoConfig.for_model(family.model_type, **COMMON, **family.config)


def sharp_causal_lm(name: str) -> torch.nn.Module:
    """The tiny random causal LM of family ``name`` with its expert weights redrawn from
    N(0, 0.3): random init leaves them tiny, and then the experts hardly matter."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(FAMILIES[name]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "experts" in n:
                p.normal_(0.0, 0.3)
    return model


def inputs(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 100, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, -2:] = 0  # some padding
    return ids, mask


# --- Hugging Face checkpoints on disk, a local data file, one federated round -----------------

def save_family(name: str, directory: Path, tokenizer, **overrides) -> Path:
    """A tiny random checkpoint of family ``name`` (``overrides``: config fields to change)."""
    family = FAMILIES[name]
    fields = {**COMMON, "vocab_size": tokenizer.vocab_size, "pad_token_id": tokenizer.pad_token_id, **family.config}
    config = transformers.AutoConfig.for_model(family.model_type, **{**fields, **overrides})
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def write_data(path: Path, per_class: int = 8) -> Path:
    """A small 3-topic file in the format its suffix names."""
    bbc = load_bbc_news()
    rows = []
    for label in (0, 1, 4):
        texts = [t for t, y in zip(bbc.texts, bbc.labels) if y == label][:per_class]
        rows += [{"body": t[:300], "topic": bbc.label_names[label]} for t in texts]
    import datasets

    table = datasets.Dataset.from_list(rows)
    {".csv": table.to_csv, ".jsonl": table.to_json, ".parquet": table.to_parquet}[path.suffix](str(path))
    return path


# Three sites with their own label skew (site 2 has no "tech"): what write_sites writes.
SITES = {0: {"business": 10, "sport": 3, "tech": 2}, 1: {"business": 2, "sport": 10, "tech": 4},
         2: {"business": 3, "sport": 9}}


def write_sites(folder: Path, suffix: str = ".jsonl") -> list[str]:
    """One file per site (columns body, topic; SITES' label counts), disjoint BBC texts."""
    bbc = load_bbc_news()
    names = {0: "business", 3: "sport", 4: "tech"}
    by_label = {names[y]: [t for t, yy in zip(bbc.texts, bbc.labels) if yy == y] for y in names}
    taken = dict.fromkeys(by_label, 0)
    files = []
    for site, counts in SITES.items():
        rows = []
        for label, n in counts.items():
            rows += [{"body": t[:300], "topic": label} for t in by_label[label][taken[label]:taken[label] + n]]
            taken[label] += n
        path = folder / f"site{site}{suffix}"
        if suffix == ".csv":
            with open(path, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=["body", "topic"])
                writer.writeheader()
                writer.writerows(rows)
        else:
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        files.append(str(path))
    return files


def mixtral_config(mixtral: tuple[Path, Path], out, **changes) -> RunConfig:
    """A 2-client, 1-round run of the tiny Mixtral checkpoint and data file of the
    ``mixtral`` fixture (tests/conftest.py), with ``changes`` on top."""
    model, data = mixtral
    settings = dict(model=str(model), dataset=str(data), text_column="body", label_column="topic", clients=2,
                    rounds=1, local_steps=2, batch_size=4, max_length=16, alpha=5.0, test_fraction=0.25, out=str(out))
    return RunConfig(**{**settings, **changes}).validate()


def one_round_replies(cfg: RunConfig):
    """One HFedMoE round in-process: (server access, old state, each client's reply, new state)."""
    server, _, state, replies, new = one_round_parties(cfg)
    return server, state, replies, new


def one_round_parties(cfg: RunConfig):
    """One HFedMoE round in-process: (server access, client access, old state, each client's
    reply, new state); one client model trains every client in turn, the last one stays in it."""
    server = make_access(build_model(cfg, pretrained=True))
    client = make_access(build_model(cfg, pretrained=False))
    budgets = cfg.budgets_for(server.num_layers, server.num_experts)
    strategy = HFedMoE(server.param_groups(), dict(enumerate(budgets)), cfg.to_json(), cfg.tau)
    state = server.state_dict()
    strategy.set_global_state(state)
    updates, replies = [], []
    for pid in range(cfg.clients):
        reply = client_round(cfg, client, load_client_data(cfg, pid), state, budgets[pid], 1)
        assert set(reply.tensors) <= set(state)
        updates.append(ReceivedUpload.in_process(pid, reply))
        replies.append(reply)
    new = strategy.aggregate(updates)
    new.pop("__alpha__")
    server.load_state_dict(new, strict=True)
    return server, client, state, replies, new


def one_round(cfg: RunConfig) -> tuple[dict, list[dict], dict]:
    """One HFedMoE round in-process: returns (old state, per-client replies' metrics, new state)."""
    _, state, replies, new = one_round_replies(cfg)
    return state, [reply.metrics for reply in replies], new


def tiny_switch() -> torch.nn.Module:
    """A tiny Switch Transformer (one sparse encoder and one sparse decoder layer, 4 experts)."""
    config = transformers.SwitchTransformersConfig(
        vocab_size=100, d_model=32, d_kv=16, d_ff=32, num_heads=2, num_layers=2, num_decoder_layers=2,
        num_sparse_encoder_layers=1, num_sparse_decoder_layers=1, num_experts=4, expert_capacity=64,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    torch.manual_seed(0)
    return transformers.SwitchTransformersForConditionalGeneration(config)
