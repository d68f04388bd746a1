"""Each site's own data: a client trains on its own file (a SuperNode's ``data-path`` or
``--client-data``), the label set is agreed from the names the sites report (the server
reads no site file), and the global model is scored where the data is (federated
evaluation), on a server-side test file, or both."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import hfedmoe.recipe.data as data_module
from hfedmoe.cli import build_parser, run_config_from
from hfedmoe.config import ConfigError, RunConfig
from hfedmoe.export import evaluate_directory
from hfedmoe.fl.inprocess import InProcessGrid, server_identity, run_inprocess
from hfedmoe.fl.client_app import app as client_app
from hfedmoe.fl.server_app import NodeReport, agree_labels, run_server
from hfedmoe.recipe import (
    SiteSource,
    build_model,
    dataset_split,
    load_client_data,
    load_client_test,
    load_test_batches,
    resolve_evaluation,
)
from hfedmoe.recipe.data import site_split
from hfedmoe.training import evaluate

from builders import mixtral_config, write_sites

@pytest.fixture(scope="module")
def sites(tmp_path_factory) -> list[str]:
    return write_sites(tmp_path_factory.mktemp("sites"))


def site_config(mixtral, out, files, **changes) -> RunConfig:
    return mixtral_config(mixtral, out, **{"dataset": "bbc-news", "client_data": files, "clients": len(files),
                                           "local_steps": 1, "test_fraction": 0.3, **changes})


def rows(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


# --- config and CLI --------------------------------------------------------------------------

def test_client_data_gives_the_number_of_clients_and_a_directory_works(sites, tmp_path):
    parser = build_parser()
    cfg = run_config_from(parser.parse_args(["run", "--client-data", ",".join(sites)]))
    assert cfg.clients == 3 and cfg.client_data_files() == sites
    folder = Path(sites[0]).parent
    cfg = run_config_from(parser.parse_args(["run", "--client-data", str(folder)]))
    assert cfg.client_data_files() == sorted(sites) and cfg.clients == 3


@pytest.mark.parametrize("changes, match", [
    ({"clients": 2}, "gives 3 files for 2 clients"),
    ({"dataset": "x.csv"}, "give one of them"),
    ({"evaluation": "central"}, "--evaluation must be one of"),
    ({"labels": ["sport"]}, "two or more distinct class names"),
    ({"test_data": "/no/such.csv"}, "no such file"),
])
def test_data_config_errors_name_the_fix(sites, changes, match):
    with pytest.raises(ConfigError, match=match):
        RunConfig(**{"client_data": sites, "clients": 3, **changes}).validate()


def test_a_directory_without_data_files_is_a_clear_error(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ConfigError, match="holds no .csv"):
        RunConfig(client_data=[str(tmp_path)]).client_data_files()


def test_evaluation_auto_follows_who_holds_a_test_set(sites):
    cfg = RunConfig(client_data=sites, clients=3)
    assert resolve_evaluation(cfg, sites=True) == "federated"
    assert resolve_evaluation(RunConfig(), sites=False) == "server"
    with pytest.raises(ConfigError, match="pass --test-data FILE"):
        resolve_evaluation(RunConfig(client_data=sites, clients=3, evaluation="both"), sites=True)
    assert resolve_evaluation(RunConfig(client_data=sites, clients=3, test_data=sites[0], evaluation="both"),
                              sites=True) == "both"


# --- label agreement (no data crosses) -----------------------------------------------------

def test_the_label_set_is_the_union_of_the_names_the_sites_report():
    cfg = RunConfig()
    agree_labels(cfg, {7: NodeReport(0, 2, own_data=True, label_names=["sport", "business"]),
                       9: NodeReport(1, 2, own_data=True, label_names=["tech", "sport"])})
    assert cfg.labels == ["business", "sport", "tech"]


def test_given_labels_must_cover_every_site():
    cfg = RunConfig(labels=["business", "sport"])
    with pytest.raises(ConfigError, match=r"partition 1's data holds label\(s\) \['tech'\] outside --labels"):
        agree_labels(cfg, {7: NodeReport(0, 2, own_data=True, label_names=["sport"]),
                           9: NodeReport(1, 2, own_data=True, label_names=["tech"])})


def test_a_site_maps_its_labels_onto_the_agreed_ids(sites):
    cols = dict(text_column="body", label_column="topic")
    cfg = RunConfig(client_data=sites, clients=3, labels=["business", "sport", "tech"], test_fraction=0.3, **cols)
    train, held_out = site_split(cfg, 2, SiteSource(sites[2]))  # site 2 has no tech
    assert train.label_names == ["business", "sport", "tech"]
    assert train.label_counts()[2] == 0 and held_out.label_counts()[2] == 0
    assert len(train) + len(held_out) == 12 and train.label_counts()[1] + held_out.label_counts()[1] == 9
    with pytest.raises(ConfigError, match="outside the run's label set"):
        site_split(RunConfig(client_data=sites, clients=3, labels=["business", "tech"], **cols), 1,
                   SiteSource(sites[1]))


# --- runs (in-process engine: the real ServerApp/ClientApp code) ---------------------------

def test_sites_train_on_their_own_files_and_evaluation_is_federated(mixtral, sites, tmp_path, one_thread):
    cfg = site_config(mixtral, tmp_path / "r", sites)
    run_inprocess(cfg)
    saved = json.loads((tmp_path / "r" / "config.json").read_text())
    assert saved["labels"] == ["business", "sport", "tech"] and saved["evaluation"] == "federated"
    history = rows(tmp_path / "r")
    for row in history:
        fed = row["federated"]
        assert fed["clients"] == [0, 1, 2] and fed["failures"] == []
        assert (row["accuracy"], row["loss"]) == (fed["accuracy"], fed["loss"])
    # Evaluation sends the model to every client, as training does (all 3 take part).
    assert history[1]["federated"]["bytes_down"] == history[1]["bytes_down"] == history[0]["federated"]["bytes_down"]
    # Each client trained on the training part of its own file, and scored on the rest.
    held = [load_client_test(cfg, pid).num_samples for pid in range(3)]
    assert history[0]["federated"]["examples"] == sum(held)
    # Each client's own score is kept too, and the pooled one is their example-weighted mean.
    per_client = history[-1]["federated"]["per_client"]
    assert [per_client[str(pid)]["examples"] for pid in range(3)] == held
    pooled = sum(c["accuracy"] * c["examples"] for c in per_client.values()) / sum(held)
    assert history[-1]["federated"]["accuracy"] == pytest.approx(pooled, abs=1e-12)
    trained = {c["id"]: c["num_examples"] for c in history[1]["clients"]}
    assert trained == {pid: load_client_data(cfg, pid).num_examples for pid in range(3)}
    assert [trained[p] + held[p] for p in range(3)] == [15, 16, 12]
    # `hfedmoe eval` of the exported model scores the clients' held-out rows together:
    # exactly the run's last federated figures.
    scores = evaluate_directory(tmp_path / "r" / "final", {})
    assert scores["num_examples"] == sum(held) and scores["dataset"] == "the clients' held-out data"
    assert (scores["accuracy"], scores["loss"]) == pytest.approx((history[-1]["accuracy"], history[-1]["loss"]),
                                                                 rel=1e-6)


def test_nodes_with_a_data_path_are_read_only_by_their_client(mixtral, sites, tmp_path, monkeypatch, one_thread):
    """The deployment case: no --client-data, each node's config names its file; the
    server agrees the labels from the names and never opens a site file."""
    cfg = mixtral_config(mixtral, tmp_path / "r", dataset="bbc-news", clients=3, local_steps=1, test_fraction=0.3,
                         text_column="text", label_column="label")
    grid = InProcessGrid(client_app, 3)
    for pid, (node, context) in enumerate(sorted(grid.contexts.items())):
        context.node_config.update({"data-path": sites[pid], "text-column": "body", "label-column": "topic"})
    inside_client = []
    deliver = grid.deliver

    def deliver_marked(msg):  # a message being handled by a node's ClientApp
        inside_client.append(True)
        try:
            return deliver(msg)
        finally:
            inside_client.pop()

    monkeypatch.setattr(grid, "deliver", deliver_marked)
    read = data_module.read_site.__wrapped__
    opened = []

    def read_site(spec):
        assert inside_client, f"the server read the site file {spec.dataset}"
        opened.append(spec.dataset)
        return read(spec)

    monkeypatch.setattr(data_module, "read_site", read_site)
    with server_identity():
        run_server(grid, cfg)
    assert sorted(set(opened)) == sorted(sites)
    assert json.loads((tmp_path / "r" / "config.json").read_text())["labels"] == ["business", "sport", "tech"]
    assert all("federated" in row for row in rows(tmp_path / "r"))
    with pytest.raises(ConfigError, match="held their own data on their own machines"):
        evaluate_directory(tmp_path / "r" / "final", {})
    # A file with some of the classes is scored with the model's class ids.
    scores = evaluate_directory(tmp_path / "r" / "final", {"dataset": sites[2], "text_column": "body",
                                                           "label_column": "topic"}, split="all")
    assert scores["num_examples"] == 12


def test_federated_scores_on_a_shared_dataset_pool_to_the_server_score(mixtral, tmp_path, one_thread):
    """On a shared dataset each client scores its share of the test split, split like its
    training data: the example-weighted mean is then the server's score on the whole split."""
    cfg = mixtral_config(mixtral, tmp_path / "r", clients=3, local_steps=1, evaluation="both")
    run_inprocess(cfg)
    for row in rows(tmp_path / "r"):
        assert row["federated"]["examples"] == len(dataset_split(cfg)[1]) and row["federated"]["clients"] == [0, 1, 2]
        assert row["federated"]["accuracy"] == pytest.approx(row["accuracy"], abs=1e-12)
        assert row["federated"]["loss"] == pytest.approx(row["loss"], rel=1e-5)


def test_a_server_test_file_scores_a_site_federation(mixtral, sites, tmp_path, one_thread):
    cfg = site_config(mixtral, tmp_path / "r", sites, test_data=sites[0], evaluation="both")
    run_inprocess(cfg)
    history = rows(tmp_path / "r")
    assert all(r["federated"]["examples"] == 14 for r in history)  # 5 + 5 + 4 held out
    # The row's own score is the server's, on the whole test file (the initial model at round 0).
    initial = evaluate(build_model(cfg, pretrained=True), load_test_batches(cfg), task=cfg.task)
    assert initial["num_examples"] == 15
    assert (history[0]["accuracy"], history[0]["loss"]) == pytest.approx((initial["accuracy"], initial["loss"]))


def test_a_node_whose_file_is_missing_stops_the_run_before_round_1(mixtral, sites, tmp_path, one_thread):
    cfg = mixtral_config(mixtral, tmp_path / "r", dataset="bbc-news", clients=2, local_steps=1)
    grid = InProcessGrid(client_app, 2)
    for pid, context in enumerate(grid.contexts.values()):
        context.node_config["data-path"] = [sites[0], str(tmp_path / "gone.csv")][pid]
    with server_identity(), pytest.raises(RuntimeError, match=r"gone.csv does not exist"):
        run_server(grid, cfg)
    assert not (tmp_path / "r" / "metrics.jsonl").exists()
