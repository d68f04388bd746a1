"""The three task formats on MoE checkpoints: classification (head or label words),
multiple-choice and causal-LM, from local files written here; hub dataset ids
mapped onto the same loaders (tested offline with a stand-in for the download).

Every family runs one federated HFedMoE round in-process for every task format
(the same client_round and server aggregation the Flower apps call).
"""

from __future__ import annotations

import json
import math

import datasets
import pytest
import torch

from hfedmoe.config import ConfigError, RunConfig
from hfedmoe.data import encode_choices, encode_instructions, load_bbc_news
from hfedmoe.data.files import load_choice_file, load_instruction_file
from hfedmoe.models.hf_wrappers import LabelWordsClassifier
from hfedmoe.training.objectives import CausalLM, MultipleChoice
from hfedmoe.recipe import (
    DataSpec,
    build_model,
    hf_head,
    load_client_data,
    load_dataset_split,
    load_test_batches,
    model_spec,
)
from hfedmoe.training import evaluate

from builders import one_round, save_family, write_data

FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3"]


def write_choices(path, n: int = 24):
    """A PIQA-like file: a goal, two solutions, the right one's index (it is the longer one)."""
    bbc = load_bbc_news()
    rows = []
    for i in range(n):
        words = bbc.texts[i].split()
        right, wrong = " ".join(words[10:16]), " ".join(words[20:22])
        sols = [right, wrong] if i % 2 == 0 else [wrong, right]
        rows.append({"goal": " ".join(words[:8]), "sol1": sols[0], "sol2": sols[1], "label": i % 2,
                     # a csv cell holds a list as JSON text
                     "options": json.dumps(sols) if path.suffix == ".csv" else sols, "letter": "AB"[i % 2]})
    table = datasets.Dataset.from_list(rows)
    {".csv": table.to_csv, ".jsonl": table.to_json, ".parquet": table.to_parquet}[path.suffix](str(path))
    return path


def write_instructions(path, n: int = 24):
    bbc = load_bbc_news()
    rows = [{"instruction": "Give the topic: " + " ".join(bbc.texts[i].split()[:12]),
             "output": bbc.label_names[bbc.labels[i]], "category": "a" if i % 3 else "b"} for i in range(n)]
    table = datasets.Dataset.from_list(rows)
    {".csv": table.to_csv, ".jsonl": table.to_json, ".parquet": table.to_parquet}[path.suffix](str(path))
    return path


def run_cfg(model_dir, data, **kw) -> RunConfig:
    base = dict(model=str(model_dir), dataset=str(data), clients=2, rounds=1, local_steps=2, batch_size=4,
                max_length=24, alpha=5.0, test_fraction=0.25, eval_batch_size=8)
    return RunConfig(**{**base, **kw}).validate()


# --- encoding -------------------------------------------------------------------------
def test_choice_encoding_marks_exactly_the_choice_tokens(tokenizer):
    enc = encode_choices(tokenizer, ["what is it", "why"], [["a red apple", "no"], ["yes", "maybe not"]],
                         max_length=12)
    assert enc["input_ids"].shape == (2, 2, 12)
    for i, options in enumerate([["a red apple", "no"], ["yes", "maybe not"]]):
        for k, option in enumerate(options):
            marked = enc["input_ids"][i, k][enc["choice_mask"][i, k].bool()].tolist()
            assert marked == tokenizer(" " + option, add_special_tokens=False)["input_ids"]
            assert (enc["choice_mask"][i, k] <= enc["attention_mask"][i, k]).all()


def test_instruction_labels_cover_the_response_only_and_survive_long_prompts(tokenizer):
    long_prompt = " ".join(["word"] * 100)
    enc = encode_instructions(tokenizer, [long_prompt, "short"], ["the answer", "ok"], max_length=16)
    for i, response in enumerate(["the answer", "ok"]):
        labelled = enc["labels"][i][enc["labels"][i] != -100].tolist()
        assert labelled == tokenizer(" " + response, add_special_tokens=False)["input_ids"]
        assert (enc["labels"][i] != -100).sum() <= enc["attention_mask"][i].sum()
    assert enc["attention_mask"][0].sum() == 16  # the long prompt was cut, from the left


def test_multiple_choice_scores_are_length_normalised_log_likelihoods():
    vocab, t = 5, 4

    class Fixed(torch.nn.Module):  # predicts token 2 with certainty-ish everywhere
        def forward(self, ids, mask):
            logits = torch.zeros(*ids.shape, vocab)
            logits[..., 2] = 5.0
            return logits

    ids = torch.tensor([[[1, 2, 2, 0], [1, 3, 3, 3]]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
             "choice_mask": torch.tensor([[[0, 1, 1, 0], [0, 1, 1, 1]]]), "labels": torch.tensor([0])}
    scores = MultipleChoice().scores(Fixed(), batch)
    logp = torch.log_softmax(torch.tensor([0.0, 0, 5, 0, 0]), 0)
    assert torch.allclose(scores, torch.tensor([[logp[2].item(), logp[3].item()]]), atol=1e-6)
    assert MultipleChoice().eval_sums(Fixed(), batch)["correct"] == 1


def test_causal_lm_loss_ignores_prompt_tokens():
    class Uniform(torch.nn.Module):
        def forward(self, ids, mask):
            return torch.zeros(*ids.shape, 7)

    ids = torch.tensor([[1, 2, 3, 4]])
    labels = torch.tensor([[-100, -100, 3, 4]])
    loss, mask = CausalLM().loss(Uniform(), {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                                             "labels": labels})
    assert math.isclose(loss.item(), math.log(7), rel_tol=1e-6)
    sums = CausalLM().eval_sums(Uniform(), {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                                            "labels": labels})
    assert sums["count"] == 2
    assert math.isclose(CausalLM().metrics(sums, 1)["perplexity"], 7.0, rel_tol=1e-5)


# --- files ------------------------------------------------------------------------------
@pytest.mark.parametrize("choices, answer", [("sol1,sol2", "label"), ("options", "label"), ("options", "letter")])
@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_choice_files_load_the_same_in_every_layout(choices, answer, suffix, tmp_path):
    path = write_choices(tmp_path / f"mc{suffix}")
    data = load_choice_file(path, "goal", choices, answer)
    assert data.task == "multiple-choice" and len(data) == 24 and data.label_names == ["A", "B"]
    assert data.labels == [i % 2 for i in range(24)]
    assert all(len(c) == 2 for c in data.choices)


@pytest.mark.parametrize("content, match", [
    ('{"q": "x", "choices": ["a"], "answer": 0}\n{"q": "y", "choices": ["a", "b"], "answer": 0}\n',
     "at least two non-empty text choices"),
    ('{"q": "x", "choices": ["a", "b"], "answer": 0}\n{"q": "y", "choices": ["a", "b", "c"], "answer": 0}\n',
     "different numbers of choices"),
    ('{"q": "x", "choices": ["a", "b"], "answer": 5}\n{"q": "y", "choices": ["a", "b"], "answer": 0}\n',
     "0-based index below 2"),
    ('{"q": "x", "options": ["a", "b"], "answer": 0}\n', "no column 'choices'"),
])
def test_bad_choice_files_fail_with_one_message(content, match, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match=match):
        load_choice_file(path, "q", "choices", "answer")


def test_instruction_file_groups_by_category_when_present(tmp_path):
    path = write_instructions(tmp_path / "sft.jsonl")
    grouped = load_instruction_file(path, "instruction", "output", "category")
    assert grouped.label_names == ["a", "b"] and grouped.task == "causal-lm"
    single = load_instruction_file(path, "instruction", "output", "no-such-column")
    assert single.label_names == ["all"] and set(single.labels) == {0}
    with pytest.raises(ValueError, match="no column 'answer'"):
        load_instruction_file(path, "instruction", "answer")


def test_task_and_data_format_mismatch_is_one_config_error(tmp_path):
    with pytest.raises(ConfigError, match="embedded MiniLM is an encoder"):
        RunConfig(task="causal-lm", dataset=str(tmp_path / "x.jsonl")).validate()
    with pytest.raises(ConfigError, match="--task must be one of"):
        RunConfig(task="qa").validate()


# --- hub ids, offline: the download replaced by a table with the hub's schema --------------
@pytest.mark.parametrize("dataset_id, rows, task, expect", [
    ("piqa", [{"goal": "g1", "sol1": "a", "sol2": "b", "label": 1}, {"goal": "g2", "sol1": "c", "sol2": "d",
                                                                         "label": 0}] * 2,
     "multiple-choice", (["g1", "g2"], [["a", "b"], ["c", "d"]], [1, 0])),
    ("hellaswag", [{"ctx": "c1", "endings": ["e", "f", "g", "h"], "label": "2"},
                   {"ctx": "c2", "endings": ["i", "j", "k", "l"], "label": "0"}] * 2,
     "multiple-choice", (["c1", "c2"], [["e", "f", "g", "h"], ["i", "j", "k", "l"]], [2, 0])),
    ("cais/mmlu", [{"question": "q1", "subject": "x", "choices": ["1", "2", "3", "4"], "answer": 3},
                   {"question": "q2", "subject": "x", "choices": ["5", "6", "7", "8"], "answer": 1}] * 2,
     "multiple-choice", (["q1", "q2"], [["1", "2", "3", "4"], ["5", "6", "7", "8"]], [3, 1])),
])
def test_hub_ids_map_their_standard_fields(dataset_id, rows, task, expect, monkeypatch):
    import hfedmoe.data.hub as hub

    asked = {}

    def fake_fetch(name, subset, split):
        asked.update(name=name, subset=subset, split=split)
        return datasets.Dataset.from_list(rows)

    question = next(iter(rows[0]))  # distinct copies: duplicates would be dropped before the split
    rows = rows[:2] + [{**r, question: r[question] + " again"} for r in rows[2:]]
    monkeypatch.setattr(hub, "fetch_table", fake_fetch)
    data = load_dataset_split.__wrapped__(DataSpec(dataset_id, task), 0.5, 0)[0]
    full = hub.load_hub_dataset(dataset_id, task, "text", "label", "choices", "answer", "response")
    assert (full.texts[:2], full.choices[:2], full.labels[:2]) == expect
    assert data.task == "multiple-choice"
    if dataset_id == "cais/mmlu":
        assert asked == {"name": "cais/mmlu", "subset": "all", "split": "test"}


def test_ag_news_keeps_the_hub_class_names(monkeypatch):
    import hfedmoe.data.hub as hub

    features = datasets.Features({"text": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["World", "Sports", "Business", "Sci/Tech"])})
    table = datasets.Dataset.from_dict({"text": ["a", "b", "c", "d"] * 2, "label": [0, 1, 2, 3] * 2},
                                       features=features)
    monkeypatch.setattr(hub, "fetch_table", lambda *a: table)
    data = hub.load_hub_dataset("ag_news", "classification", "text", "label", "choices", "answer", "response")
    assert data.label_names == ["World", "Sports", "Business", "Sci/Tech"] and data.labels[:4] == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="run it with --task classification"):
        hub.load_hub_dataset("ag_news", "multiple-choice", "text", "label", "choices", "answer", "response")


def test_an_unreachable_hub_id_is_one_config_error(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    cfg = RunConfig(dataset="no-such-user/no-such-dataset")
    with pytest.raises(ConfigError, match="cannot load it from the Hugging Face hub"):
        load_client_data(cfg, 0)


# --- one federated round per family and task ---------------------------------------------
@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("models")
    return {name: save_family(name, root / name, tokenizer) for name in FAMILIES}


def _check_round(cfg, expert_keys_must_move=True):
    old, metrics, new = one_round(cfg)
    for m in metrics:
        assert math.isfinite(m["train-loss"])
    changed = [k for k in old if not torch.equal(old[k], new[k])]
    if expert_keys_must_move:
        assert any(".__expert__." in k for k in changed), "no expert moved"
    scores = evaluate(build_model(cfg, pretrained=False), load_test_batches(cfg), task=cfg.task)
    return metrics, changed, scores


@pytest.mark.parametrize("name", FAMILIES)
def test_multiple_choice_round(name, models, tmp_path):
    cfg = run_cfg(models[name], write_choices(tmp_path / "mc.jsonl"), task="multiple-choice",
                  text_column="goal", choices_column="sol1,sol2", answer_column="label")
    assert hf_head(cfg) == "causal-lm"
    metrics, changed, scores = _check_round(cfg)
    assert 0.0 <= scores["accuracy"] <= 1.0 and scores["num_examples"] == 6
    assert model_spec(cfg)["kind"] == "hf-causal-lm"


@pytest.mark.parametrize("name", FAMILIES)
def test_causal_lm_round(name, models, tmp_path):
    cfg = run_cfg(models[name], write_instructions(tmp_path / "sft.csv"), task="causal-lm",
                  text_column="instruction", response_column="output", label_column="category")
    metrics, changed, scores = _check_round(cfg)
    assert scores["perplexity"] > 1.0 and math.isclose(scores["perplexity"], math.exp(scores["loss"]), rel_tol=1e-6)
    assert any("lm_head" in k for k in changed), "the LM head did not train"


def test_olmoe_classifies_with_label_words(models, tmp_path):
    cfg = run_cfg(models["olmoe"], write_data(tmp_path / "d.csv"), text_column="body", label_column="topic")
    assert hf_head(cfg) == "label-words"
    model = build_model(cfg, pretrained=False)
    assert isinstance(model, LabelWordsClassifier)
    spec = model_spec(cfg)
    assert spec["kind"] == "hf-label-words" and len(set(spec["label_token_ids"])) == 3
    metrics, changed, scores = _check_round(cfg)
    assert scores["num_examples"] == 6
    with pytest.raises(ConfigError, match="no sequence-classification head.*--classifier label-words"):
        hf_head(run_cfg(models["olmoe"], write_data(tmp_path / "d.csv"), text_column="body",
                        label_column="topic", classifier="head"))


def test_label_words_logits_are_the_lm_logits_at_the_last_real_token(models, tmp_path):
    cfg = run_cfg(models["mixtral"], write_data(tmp_path / "d.csv"), text_column="body", label_column="topic",
                  classifier="label-words")
    model = build_model(cfg, pretrained=False).eval()
    ids = torch.randint(5, 100, (2, 6))
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        full = model.model(input_ids=ids, attention_mask=mask).logits
        got = model(ids, mask)
    want = torch.stack([full[0, 3], full[1, 5]])[:, model.label_token_ids]
    assert torch.allclose(got, want, atol=1e-5)


def test_label_words_that_share_a_first_token_are_refused(models, tmp_path):
    path = tmp_path / "same.jsonl"
    path.write_text("".join(json.dumps({"body": f"text {i}", "topic": t}) + "\n"
                            for i, t in enumerate(["sport news", "sport gossip"] * 3)))
    cfg = run_cfg(models["olmoe"], path, text_column="body", label_column="topic")
    with pytest.raises(ConfigError, match="start with the same token"):
        build_model(cfg, pretrained=False)


# --- Switch Transformers (encoder-decoder) ---------------------------------------------------
@pytest.fixture(scope="module")
def switch_dir(tmp_path_factory, tokenizer):
    import transformers

    config = transformers.SwitchTransformersConfig(
        vocab_size=tokenizer.vocab_size, d_model=32, d_kv=16, d_ff=32, num_heads=2, num_layers=2,
        num_decoder_layers=2, num_sparse_encoder_layers=1, num_sparse_decoder_layers=1, num_experts=4,
        expert_capacity=64, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.sep_token_id,
        decoder_start_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("switch") / "switch"
    transformers.SwitchTransformersForConditionalGeneration(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def test_switch_as_lm_puts_decoder_logits_where_a_causal_lm_would(switch_dir, tmp_path):
    from hfedmoe.models.hf_wrappers import Seq2SeqAsLM

    cfg = run_cfg(switch_dir, write_instructions(tmp_path / "sft.jsonl"), task="causal-lm",
                  text_column="instruction", response_column="output")
    model = build_model(cfg, pretrained=False).eval()
    assert isinstance(model, Seq2SeqAsLM)
    ids = torch.tensor([[5, 6, 7, 8, 9, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]])
    cont = torch.tensor([[0, 0, 0, 1, 1, 0]])  # context 5 6 7, continuation 8 9
    with torch.no_grad():
        got = model(ids, mask, continuation_mask=cont)
        want = model.model(input_ids=torch.tensor([[5, 6, 7, 0, 0, 0]]),
                           attention_mask=torch.tensor([[1, 1, 1, 0, 0, 0]]),
                           decoder_input_ids=torch.tensor([[0, 8, 9, 0, 0, 0]]),
                           decoder_attention_mask=torch.tensor([[1, 1, 1, 0, 0, 0]])).logits
    assert torch.allclose(got[0, 2], want[0, 0], atol=1e-5)  # predicts 8 (position 3) from position 2
    assert torch.allclose(got[0, 3], want[0, 1], atol=1e-5)  # predicts 9
    assert got[0, [0, 1, 4, 5]].abs().sum() == 0
    # encoder layer routed the 3 context tokens, decoder layer the 3 decoder inputs
    assert model.last_routing_mask.shape == (1, 6, 2)
    assert model.last_routing_mask[0, :, 0].tolist() == [1, 1, 1, 0, 0, 0]
    assert model.last_routing_mask[0, :, 1].tolist() == [1, 1, 1, 0, 0, 0]


@pytest.mark.parametrize("task", ["classification", "multiple-choice", "causal-lm"])
def test_switch_round(task, switch_dir, tmp_path):
    if task == "classification":
        cfg = run_cfg(switch_dir, write_data(tmp_path / "d.csv"), text_column="body", label_column="topic")
        assert model_spec(cfg)["kind"] == "hf-seq2seq-label-words"
    elif task == "multiple-choice":
        cfg = run_cfg(switch_dir, write_choices(tmp_path / "mc.jsonl"), task=task, text_column="goal",
                      choices_column="options", answer_column="letter")
    else:
        cfg = run_cfg(switch_dir, write_instructions(tmp_path / "sft.csv"), task=task,
                      text_column="instruction", response_column="output")
    metrics, changed, scores = _check_round(cfg, expert_keys_must_move=False)  # Switch: no virtual keys
    assert any(".experts.expert_" in k for k in changed), "no Switch expert moved"
    assert 0.0 <= scores["accuracy"] <= 1.0
