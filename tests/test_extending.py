"""docs/extending.md, executed: its code blocks register a toy method and a toy MoE layout,
and the tests below run a federated round of that method on a model of that layout,
through the same client round and strategy the Flower apps call."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from hfedmoe.cli import main
from hfedmoe.client_round import client_round
from hfedmoe.config import ConfigError, RunConfig
from hfedmoe.data import TensorBatches
from hfedmoe.fl.records import ReceivedUpload
from hfedmoe.fl.strategy import HFedMoE
from hfedmoe.methods import get_method, server_merges, unregister_method
from hfedmoe.methods.merging import data_size_weights, merge_over_uploaders
from hfedmoe.moe import MoEAccess, family_of, make_access, unregister_family
from hfedmoe.recipe import ClientData
from hfedmoe.training import BatchRouting

DOC = Path(__file__).resolve().parents[1] / "docs" / "extending.md"
LAYERS, EXPERTS, WIDTH, VOCAB, LABELS = 2, 4, 8, 50, 3


@pytest.fixture(scope="module")
def doc():
    """The namespace of the page's code blocks, run in order (they register both plug-ins)."""
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) == 2, "docs/extending.md should hold the method block and the family block"
    namespace: dict = {}
    try:
        for block in blocks:
            exec(compile(block, str(DOC), "exec"), namespace)
        yield namespace
    finally:
        unregister_method("first-experts")
        unregister_family("top-one")


class ToyClassifier(nn.Module):
    """Embedding -> TopOneMoE blocks -> mean pool -> linear head."""

    def __init__(self, block: type[nn.Module], seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.blocks = nn.ModuleList(block(WIDTH, EXPERTS) for _ in range(LAYERS))
        self.classifier = nn.Linear(WIDTH, LABELS)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.embed(input_ids)
        for block in self.blocks:
            hidden = block(hidden)
        mask = attention_mask.unsqueeze(-1).float()
        return self.classifier((hidden * mask).sum(dim=1) / mask.sum(dim=1))


def client_data(partition_id: int, n: int = 16, t: int = 6) -> ClientData:
    g = torch.Generator().manual_seed(10 + partition_id)
    ids = torch.randint(1, VOCAB, (n, t), generator=g)
    mask = torch.ones(n, t, dtype=torch.long)
    labels = torch.randint(0, LABELS, (n,), generator=g)
    batches = TensorBatches(ids, mask, labels, batch_size=4, shuffle=True, seed=partition_id)
    return ClientData(partition_id, batches, [int((labels == c).sum()) for c in range(LABELS)])


def run_config() -> RunConfig:
    return RunConfig(method="first-experts", clients=2, local_steps=3, lr=1e-2, num_experts=EXPERTS, top_k=1)


def test_the_method_is_registered_everywhere_the_registry_is_read(doc, capsys):
    run_config().validate()
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    # argparse may wrap a line at a hyphen: join the words back as they were written
    help_words = " ".join(capsys.readouterr().out.split()).replace("- ", "-")
    assert "first-experts: the lowest-numbered experts" in help_words
    assert server_merges("first-experts") == (merge_over_uploaders, data_size_weights)
    with pytest.raises(ConfigError, match="has its own aggregation"):  # no HFedMoE ablation switches
        RunConfig(method="first-experts", gate_agg="fedavg").validate()


def test_its_policy_takes_the_lowest_numbered_candidates_one_per_layer_first(doc):
    candidates = torch.tensor([[False, True, True, True], [True, False, False, True]])
    gates = torch.softmax(torch.randn(3, LAYERS, EXPERTS), dim=-1)
    plan = get_method("first-experts").plan_round(SimpleNamespace(expert_budget=3))
    routing = BatchRouting(gates, candidates, gates.mean(0), gates.mean(0), budget=3, step=0)
    assert plan.policy(routing).nonzero().tolist() == [[0, 1], [0, 2], [1, 0]]


def test_the_family_drives_a_model_of_top_one_blocks(doc):
    model = ToyClassifier(doc["TopOneMoE"])
    assert family_of(model).name == "top-one"
    access = make_access(model)
    assert isinstance(access, MoEAccess)
    assert (access.num_layers, access.num_experts, access.top_k) == (LAYERS, EXPERTS, 1)
    groups = access.param_groups()
    assert groups.experts[(1, 2)] == ("blocks.1.experts.2.weight", "blocks.1.experts.2.bias")
    assert set(groups.routers) == {"blocks.0.router.weight", "blocks.1.router.weight"}


def test_a_federated_round_of_the_toy_method_on_the_toy_layout(doc):
    cfg = run_config()
    server = make_access(ToyClassifier(doc["TopOneMoE"]))
    client = make_access(ToyClassifier(doc["TopOneMoE"], seed=1))  # overwritten by the global state
    state = {k: v.clone() for k, v in server.state_dict().items()}
    groups = server.param_groups()
    strategy = HFedMoE(groups, {1: LAYERS, 2: LAYERS * EXPERTS}, cfg.to_json(), cfg.tau,
                       expert_merge=merge_over_uploaders, router_weights=data_size_weights)
    strategy.set_global_state(state)
    received, trained = [], []
    for node, (pid, budget) in enumerate(((0, LAYERS), (1, LAYERS * EXPERTS)), start=1):
        upload = client_round(cfg, client, client_data(pid), state, budget, server_round=1)
        assert upload.failure is None and upload.metrics["experts-trained-mean"] <= budget
        uploaded = {groups.expert_of[k] for k in upload.tensors if k in groups.expert_of}
        assert uploaded == {tuple(x) for x in upload.result.trained.nonzero().tolist()}, "uploads what it trained"
        # the unconstrained client trains more than one expert per layer per batch
        assert (upload.metrics["experts-trained-mean"] > LAYERS) == (budget > LAYERS)
        trained.append(upload.result.trained)
        received.append(ReceivedUpload.in_process(node, upload))
    new = strategy.aggregate(received)
    alpha = new.pop("__alpha__")
    torch.testing.assert_close(alpha, torch.tensor([0.5, 0.5], dtype=torch.float64))  # 16 examples each
    for (layer, expert), keys in groups.experts.items():
        owners = [r for r, t in zip(received, trained) if t[layer, expert]]
        for key in keys:
            if not owners:  # nobody trained it: unchanged (Eq. 17)
                assert torch.equal(new[key], state[key])
            elif len(owners) == 1:  # one uploader: its copy
                torch.testing.assert_close(new[key], owners[0].upload.tensors[key])
    moved = [k for k in groups.all_expert_keys if not torch.equal(new[k], state[k])]
    assert moved, "no expert moved"
