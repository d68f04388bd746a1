"""The specialised starting point (hfedmoe.recipe.specialise): its public share is no
client's and no test's data, it is built once and cached, and its experts differ."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from hfedmoe.config import EMBEDDED_MODEL, SPECIALISED_MODEL, RunConfig
from hfedmoe.moe import make_access
from hfedmoe.recipe import build_model, dataset_split
from hfedmoe.recipe import specialise
from hfedmoe.recipe.data import public_examples


def test_the_public_share_is_left_out_of_every_split_only_for_the_specialised_model():
    public = set(public_examples().texts)
    plain_train, plain_test = dataset_split(RunConfig(model=EMBEDDED_MODEL))
    train, test = dataset_split(RunConfig(model=SPECIALISED_MODEL))
    assert 0.13 < len(public) / (len(plain_train.texts) + len(plain_test.texts)) < 0.17
    assert not public & (set(train.texts) | set(test.texts)), "no client trains on it, no test scores it"
    assert public <= set(plain_train.texts) | set(plain_test.texts), "the default model's data is unchanged"
    assert len(train.texts) + len(test.texts) + len(public) == len(plain_train.texts) + len(plain_test.texts)
    assert set(public_examples().label_names) == set(train.label_names)  # every topic is in the public share


def test_the_specialised_model_is_built_once_cached_and_its_experts_differ(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    torch.set_num_threads(2)
    builds = []
    real = specialise.build_specialised

    def small_build(num_experts, top_k, path, **kw):  # the recipe, shrunk to seconds
        builds.append(path)
        return real(num_experts, top_k, path, branch_steps=5, router_steps=3, batch_size=4, max_length=16,
                    log=lambda _text: None)

    monkeypatch.setattr(specialise, "build_specialised", small_build)
    cfg = RunConfig(model=SPECIALISED_MODEL, num_experts=4, top_k=2)
    model = build_model(cfg, pretrained=True)
    again = build_model(cfg, pretrained=True)
    assert builds == [specialise.cache_path(4, 2)] and builds[0].is_file(), "built on first use only"
    access, plain = make_access(model), make_access(build_model(RunConfig(num_experts=4, top_k=2), pretrained=True))
    state, plain_state, again_state = access.state_dict(), plain.state_dict(), make_access(again).state_dict()
    groups = access.param_groups()
    for key in groups.experts[(0, 0)]:
        first = [state[name] for name in (key, groups.experts[(0, 1)][groups.experts[(0, 0)].index(key)])]
        assert not torch.equal(*first), "the experts of a layer no longer start as copies of one FFN"
    for key in [*groups.all_expert_keys, *groups.routers]:
        assert torch.equal(state[key], again_state[key])  # the cache gives the same model every time
    assert any(not torch.equal(state[k], plain_state[k]) for k in groups.routers)
    dense = [k for k in groups.dense if not k.startswith("classifier")]
    assert all(torch.equal(state[k], plain_state[k]) for k in dense), "only experts and routers were specialised"
    figures = json.loads(specialise.cache_path(4, 2).with_suffix(".json").read_text())
    assert {"own_expert_share_after", "build_s"} <= set(figures)
    cached = {k: state[k] for k in [*groups.all_expert_keys, *groups.routers]}
    assert figures["weights_sha256"] == specialise.weights_digest(cached), "the digest names what the cache holds"


def test_the_weights_digest_tells_two_builds_apart():
    state = {"b": torch.arange(6, dtype=torch.float32).reshape(2, 3), "a": torch.ones(4)}
    same = {"a": torch.ones(4), "b": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    assert specialise.weights_digest(state) == specialise.weights_digest(same)  # name order, not insertion order
    nudged = {**same, "b": same["b"].clone()}
    nudged["b"][1, 2] = torch.nextafter(nudged["b"][1, 2], torch.tensor(100.0))  # one ulp
    assert specialise.weights_digest(nudged) != specialise.weights_digest(state)


def test_a_cache_of_another_model_is_refused_with_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = specialise.cache_path(4, 2)
    path.parent.mkdir(parents=True)
    save_file({"not.a.parameter": torch.zeros(1)}, str(path))
    with pytest.raises(ValueError, match="delete it"):
        build_model(RunConfig(model=SPECIALISED_MODEL, num_experts=4, top_k=2), pretrained=True)
