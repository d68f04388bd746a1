"""Hugging Face MoE checkpoints in a federated run, on a local data file.

Every family: a tiny randomly initialised config saved with save_pretrained (plus
the embedded tokenizer), loaded by path, one federated round of HFedMoE on a small
csv/jsonl/parquet file. The round runs in-process (the same client_round and
strategy aggregation the Flower apps call); one family also runs through the real
Flower simulation engine via `hfedmoe run`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

from hfedmoe.config import ConfigError, RunConfig
from hfedmoe.recipe import moe_shape

from builders import COMMON, FAMILIES, one_round, save_family, write_data
from proc_marker import MARKER, new_marker, stop_marked

CLASSIFIERS = ["mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3"]


@pytest.mark.parametrize("name", CLASSIFIERS)
@pytest.mark.parametrize("suffix", [".csv"])
def test_one_federated_round_per_family(name, suffix, tmp_path, tokenizer):
    model_dir = save_family(name, tmp_path / name, tokenizer)
    data = write_data(tmp_path / f"data{suffix}")
    cfg = RunConfig(model=str(model_dir), dataset=str(data), text_column="body", label_column="topic",
                    clients=2, rounds=1, local_steps=2, batch_size=4, max_length=16, alpha=5.0,
                    test_fraction=0.25).validate()
    layers, experts = moe_shape(cfg)
    assert (layers, experts) == (len(FAMILIES[name].moe_layers), FAMILIES[name].num_experts)
    old, metrics, new = one_round(cfg)
    total = layers * experts
    assert [m["expert-budget"] for m in metrics] == [total, total // 2]  # from the model's own experts
    for m in metrics:
        assert layers <= m["experts-trained-mean"] <= m["expert-budget"]
    changed = [k for k in old if not torch.equal(old[k], new[k])]
    assert any(".__expert__." in k for k in changed), "no expert moved"
    assert any("score" in k for k in changed), "the classification head did not train"


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_other_file_formats_load_the_same_data(suffix, tmp_path, tokenizer):
    from hfedmoe.data.files import load_text_file

    csv = load_text_file(write_data(tmp_path / "d.csv"), "body", "topic")
    other = load_text_file(write_data(tmp_path / f"d{suffix}"), "body", "topic")
    assert other.texts == csv.texts and other.labels == csv.labels and other.label_names == csv.label_names
    assert csv.label_names == ["business", "entertainment", "tech"]


def test_olmoe_without_a_classification_head_falls_back_to_label_words(tmp_path, tokenizer):
    # transformers has no OlmoeForSequenceClassification: classification reads the
    # LM's logits of the label words instead (tests/test_tasks.py runs its round).
    from hfedmoe.recipe import hf_head

    model_dir = save_family("olmoe", tmp_path / "olmoe", tokenizer)
    cfg = RunConfig(model=str(model_dir), dataset=str(write_data(tmp_path / "d.csv")), text_column="body",
                    label_column="topic", clients=2)
    assert hf_head(cfg) == "label-words"
    assert moe_shape(cfg) == (len(FAMILIES["olmoe"].moe_layers), FAMILIES["olmoe"].num_experts)
    cfg.classifier = "head"
    with pytest.raises(ConfigError, match="no sequence-classification head"):
        moe_shape(cfg)


def test_a_dense_checkpoint_is_refused_with_one_message(tmp_path, tokenizer):
    config = transformers.LlamaConfig(**{**COMMON, "vocab_size": tokenizer.vocab_size, "pad_token_id": 0},
                                      intermediate_size=16, num_hidden_layers=1)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "llama")
    tokenizer.save_pretrained(tmp_path / "llama")
    cfg = RunConfig(model=str(tmp_path / "llama"), dataset=str(write_data(tmp_path / "d.csv")),
                    text_column="body", label_column="topic")
    with pytest.raises(ConfigError, match="no Mixture-of-Experts layer"):
        moe_shape(cfg)


@pytest.mark.parametrize("problem, content, match", [
    ("missing column", "text,label\nhello,a\nworld,b\n", "no column 'body'"),
    ("empty", "body,topic\n", "holds no rows"),
    ("single example", "body,topic\nhello,a\nworld,a\nagain,b\n", "single example"),
    ("empty text", "body,topic\nhello,a\n,a\nx,b\ny,b\n", "not a non-empty text"),
])
def test_bad_data_files_fail_with_one_clear_message(problem, content, match, tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    cfg = RunConfig(dataset=str(path), text_column="body", label_column="topic")
    from hfedmoe.recipe import load_client_data as load

    with pytest.raises(ConfigError, match=match):
        load(cfg, 0)


@pytest.mark.e2e
def test_a_mixtral_checkpoint_runs_through_the_flower_engine(tmp_path, tokenizer):
    model_dir = save_family("mixtral", tmp_path / "mixtral", tokenizer)
    data = write_data(tmp_path / "d.parquet")
    out = tmp_path / "run"
    marker = new_marker()
    env = {**os.environ, MARKER: marker, "HF_HUB_OFFLINE": "1",
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    try:
        proc = subprocess.run(
            [str(Path(sys.executable).parent / "hfedmoe"), "run", "--model", str(model_dir), "--dataset", str(data),
             "--text-column", "body", "--label-column", "topic", "--rounds", "1", "--clients", "2",
             "--local-steps", "2", "--batch-size", "4", "--max-length", "16", "--alpha", "5",
             "--test-fraction", "0.25", "--engine", "simulation", "--out", str(out)],
            env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    finally:
        stop_marked(marker)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1]
    assert sorted(c["expert_budget"] for c in rows[1]["clients"]) == [4, 8]  # 2 layers x 4 experts
    spec = json.loads((out / "final" / "hfedmoe.json").read_text())["spec"]
    assert spec["kind"] == "hf-sequence-classification"
