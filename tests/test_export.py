"""A run's final/ as a Hugging Face / PEFT directory (hfedmoe.export), loaded back by
transformers alone, by PEFT, and by `hfedmoe eval` with the run's own metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hfedmoe.cli import main
from hfedmoe.config import RunConfig
from hfedmoe.fl.inprocess import run_inprocess
from hfedmoe.moe import make_access
from hfedmoe.recipe import build_model, load_test_batches

from builders import mixtral_config, write_data


def config(mixtral, out, **changes) -> RunConfig:
    return mixtral_config(mixtral, out, **changes)


@pytest.fixture(scope="module")
def full_run(mixtral, tmp_path_factory):
    cfg = config(mixtral, tmp_path_factory.mktemp("full") / "run", export_every=1)
    run_inprocess(cfg)
    return cfg


@pytest.fixture(scope="module")
def lora_run(mixtral, tmp_path_factory):
    cfg = config(mixtral, tmp_path_factory.mktemp("lora") / "run", lora_rank=4)
    run_inprocess(cfg)
    return cfg


def last_row(cfg: RunConfig) -> dict:
    return [json.loads(line) for line in (Path(cfg.out) / "metrics.jsonl").read_text().splitlines()][-1]


def hfedmoe_logits(cfg: RunConfig, state_file: Path) -> tuple[torch.Tensor, dict]:
    """Logits of the run's own model (as the server builds it) with the last checkpoint loaded."""
    model = build_model(cfg, pretrained=True)
    make_access(model).load_state_dict(load_file(str(state_file)), strict=True)
    batch = next(iter(load_test_batches(cfg)))
    model.eval()
    with torch.no_grad():
        return model(batch["input_ids"], batch["attention_mask"]), batch


def checkpoint(cfg: RunConfig) -> Path:
    directory = Path(cfg.out) / "checkpoints"
    return directory / json.loads((directory / "latest.json").read_text())["file"]


PLAIN_TRANSFORMERS = """
import json, sys, torch
from transformers import AutoModelForSequenceClassification
assert not any(m.startswith("hfedmoe") for m in sys.modules)
model = AutoModelForSequenceClassification.from_pretrained(sys.argv[1]).eval()
batch = torch.load(sys.argv[2])
with torch.no_grad():
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
torch.save({"logits": logits, "id2label": model.config.id2label}, sys.argv[3])
assert not any(m.startswith("hfedmoe") for m in sys.modules)
"""


def test_final_is_a_transformers_directory_with_the_runs_logits(full_run, tmp_path):
    final = Path(full_run.out) / "final"
    assert {"config.json", "model.safetensors", "hfedmoe.json", "tokenizer_config.json"} <= \
        {p.name for p in final.iterdir()}
    expected, batch = hfedmoe_logits(full_run, checkpoint(full_run))
    torch.save({k: batch[k] for k in ("input_ids", "attention_mask")}, tmp_path / "batch.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # no hfedmoe on the path at all
    env["HF_HUB_OFFLINE"] = "1"
    proc = subprocess.run([sys.executable, "-c", PLAIN_TRANSFORMERS, str(final), str(tmp_path / "batch.pt"),
                           str(tmp_path / "out.pt")], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = torch.load(tmp_path / "out.pt")
    assert torch.allclose(out["logits"], expected, atol=1e-5, rtol=1e-5)
    labels = json.loads((final / "hfedmoe.json").read_text())["label_names"]
    assert [out["id2label"][i] for i in range(len(labels))] == labels


def test_hfedmoe_eval_of_final_gives_the_runs_last_metrics(full_run, capsys):
    assert main(["eval", "--model", str(Path(full_run.out) / "final")]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    row = last_row(full_run)
    assert result["accuracy"] == row["accuracy"] and result["loss"] == row["loss"]


def test_export_every_k_rounds(full_run):
    exported = Path(full_run.out) / "exports" / "round-1"
    assert (exported / "model.safetensors").is_file() and (exported / "hfedmoe.json").is_file()


def test_eval_on_another_file_and_bad_input(full_run, mixtral, tmp_path, capsys):
    data = write_data(tmp_path / "other.csv", per_class=3)
    assert main(["eval", "--model", str(Path(full_run.out) / "final"), "--dataset", str(data),
                 "--split", "all"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["num_examples"] > 0 and 0.0 <= result["accuracy"] <= 1.0
    assert main(["eval", "--model", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("hfedmoe: error:")
    # A base checkpoint needs the data named.
    assert main(["eval", "--model", str(mixtral[0])]) == 2
    # ... and evaluates once it is.
    assert main(["eval", "--model", str(mixtral[0]), "--dataset", str(mixtral[1]), "--text-column", "body",
                 "--label-column", "topic", "--max-length", "16", "--test-fraction", "0.25"]) == 0


def test_lora_final_is_a_peft_adapter_peft_loads_with_the_runs_logits(lora_run, capsys):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    final = Path(lora_run.out) / "final"
    assert {"adapter_config.json", "adapter_model.safetensors", "hfedmoe.json"} <= {p.name for p in final.iterdir()}
    expected, batch = hfedmoe_logits(lora_run, checkpoint(lora_run))
    spec = json.loads((final / "hfedmoe.json").read_text())["spec"]
    base = AutoModelForSequenceClassification.from_pretrained(spec["base_path"], num_labels=spec["num_labels"])
    model = PeftModel.from_pretrained(base, final).eval()
    trained = load_file(str(Path(lora_run.out) / "final" / "adapter_model.safetensors"))
    assert any(".lora_B." in k and v.abs().sum() > 0 for k, v in trained.items())  # the adapters did train
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.allclose(logits, expected, atol=1e-5, rtol=1e-5)
    assert main(["eval", "--model", str(final)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    row = last_row(lora_run)
    assert result["accuracy"] == row["accuracy"] and result["loss"] == row["loss"]


def test_export_merge_writes_a_full_checkpoint_with_the_same_logits(lora_run, tmp_path):
    from transformers import AutoModelForSequenceClassification

    out = tmp_path / "merged"
    assert main(["export", lora_run.out, "--merge", "--out", str(out)]) == 0
    expected, batch = hfedmoe_logits(lora_run, checkpoint(lora_run))
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.allclose(logits, expected, atol=1e-4, rtol=1e-4)


def test_an_upcycled_run_exports_to_a_directory_hfedmoe_loads_back(tokenizer, mixtral, tmp_path, capsys):
    from hfedmoe.export import load_exported, read_info

    import transformers

    base = tmp_path / "bert"
    bert = transformers.BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=16, num_hidden_layers=2,
                                   num_attention_heads=2, intermediate_size=32)
    torch.manual_seed(0)
    transformers.BertModel(bert, add_pooling_layer=False).save_pretrained(base)
    tokenizer.save_pretrained(base)
    cfg = config(mixtral, tmp_path / "run", model=str(base), num_experts=4)
    run_inprocess(cfg)
    final = Path(cfg.out) / "final"
    assert read_info(final)["format"] == "hfedmoe-upcycled"
    assert main(["eval", "--model", str(final)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    row = last_row(cfg)
    assert result["accuracy"] == row["accuracy"] and result["loss"] == row["loss"]
    # The Python way: the same logits as the run's own model.
    expected, batch = hfedmoe_logits(cfg, checkpoint(cfg))
    model = load_exported(final, cfg).eval()
    with torch.no_grad():
        assert torch.equal(model(batch["input_ids"], batch["attention_mask"]), expected)


def write_instructions(path: Path, n: int = 24) -> Path:
    import datasets

    from hfedmoe.data import load_bbc_news

    bbc = load_bbc_news()
    rows = [{"instruction": "Give the topic: " + " ".join(bbc.texts[i].split()[:12]),
             "output": bbc.label_names[bbc.labels[i]], "category": "a" if i % 3 else "b"} for i in range(n)]
    datasets.Dataset.from_list(rows).to_csv(str(path))
    return path


@pytest.mark.parametrize("head", ["label-words", "causal-lm"])
def test_other_heads_export_and_evaluate_to_the_runs_metrics(head, mixtral, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    if head == "label-words":
        cfg = config(mixtral, tmp_path / "run", classifier="label-words")
    else:
        cfg = config(mixtral, tmp_path / "run", dataset=str(write_instructions(tmp_path / "sft.csv")),
                     task="causal-lm", text_column="instruction", response_column="output",
                     label_column="category", max_length=24)
    run_inprocess(cfg)
    final = Path(cfg.out) / "final"
    assert main(["eval", "--model", str(final)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    row = last_row(cfg)
    assert result["accuracy"] == row["accuracy"] and result["loss"] == row["loss"]
    if head == "causal-lm":
        assert result["perplexity"] == row["perplexity"]
    AutoModelForCausalLM.from_pretrained(final)  # a plain causal LM for transformers


def test_a_run_from_before_exports_is_re_exported_from_its_checkpoint(full_run, tmp_path, capsys):
    import shutil

    run = tmp_path / "old"
    shutil.copytree(full_run.out, run)
    shutil.rmtree(run / "final")
    (run / "final").mkdir()  # the old layout: the internal state dict and a private spec in config.json
    shutil.copy(checkpoint(full_run), run / "final" / "model.safetensors")
    (run / "final" / "config.json").write_text(json.dumps({"spec": {"kind": "hf-sequence-classification"}}))
    assert main(["eval", "--model", str(run / "final")]) == 2
    assert "hfedmoe export" in capsys.readouterr().err
    assert main(["export", str(run)]) == 0
    assert main(["eval", "--model", str(run / "final")]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    row = last_row(full_run)
    assert result["accuracy"] == row["accuracy"] and result["loss"] == row["loss"]
