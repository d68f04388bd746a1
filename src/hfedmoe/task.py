"""The task recipe: model and data of a run, rebuilt identically by server and clients.

Given a :class:`~hfedmoe.config.RunConfig`, the server builds the initial
(pretrained, upcycled) model and the held-out test set; a client builds the same
architecture and its own non-IID partition of the training set. Everything is
deterministic in the config's seed, so no data ever crosses the wire.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from hfedmoe.config import EMBEDDED_DATASET, EMBEDDED_MODEL, ConfigError, RunConfig
from hfedmoe.data import (
    TensorBatches,
    TextDataset,
    encode_choices,
    encode_instructions,
    load_bbc_news,
    load_tokenizer,
    partition_dirichlet,
    partition_iid,
    tokenize_texts,
    train_test_split,
)
from hfedmoe.data.files import FORMATS, read_table
from hfedmoe.data.hub import HubDataset, load_hub_dataset, table_to_dataset
from hfedmoe.models.hf_wrappers import (
    HFCausalLM,
    HFSequenceClassifier,
    LabelWordsClassifier,
    Seq2SeqAsLM,
    Seq2SeqLabelWords,
)
from hfedmoe.models.upcycled import UpcycledSpec, build_upcycled_classifier, embedded_model_path
from hfedmoe.moe import NoMoELayersError, make_access
from hfedmoe.moe.fused import find_fused_blocks
from hfedmoe.moe.lora import LoraTargetError, apply_lora, resolve_targets
from hfedmoe.moe.switch import decoder_layer_flags


def resolve_model_path(cfg: RunConfig) -> Path:
    """Local directory of the run's model (the embedded MiniLM by default)."""
    if cfg.model == EMBEDDED_MODEL:
        return embedded_model_path()
    path = Path(cfg.model).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return path
    if path.exists() or str(cfg.model).startswith((".", "/", "~")):
        raise ConfigError(f"--model {cfg.model!r}: no config.json there; pass a directory saved with "
                          "save_pretrained, or a Hugging Face hub id")
    return Path(cfg.model)  # a hub id: downloaded by transformers when online


def model_kind(cfg: RunConfig) -> str:
    """"upcycle" for a dense BERT-style encoder (made MoE here), "hf" for a MoE checkpoint."""
    if cfg.model == EMBEDDED_MODEL:
        return "upcycle"
    config = _hf_config(cfg)
    return "upcycle" if getattr(config, "model_type", "") == "bert" else "hf"


def _hf_config(cfg: RunConfig):
    from transformers import AutoConfig  # heavy (seconds): only paths that need it pay

    _quiet_transformers(cfg)
    path = resolve_model_path(cfg)
    try:
        return AutoConfig.from_pretrained(path, local_files_only=path.is_dir())
    except (OSError, ValueError) as err:
        raise ConfigError(f"--model {cfg.model!r}: cannot read its config ({str(err).splitlines()[0][:200]})") \
            from None


@dataclass(frozen=True)
class DataSpec:
    """Where a run's examples come from and how their columns map onto its task."""

    dataset: str
    task: str = "classification"
    text_column: str = "text"
    label_column: str = "label"
    choices_column: str = "choices"
    answer_column: str = "answer"
    response_column: str = "response"

    @classmethod
    def of(cls, cfg: RunConfig) -> "DataSpec":
        return cls(cfg.dataset, cfg.task, cfg.text_column, cfg.label_column, cfg.choices_column,
                   cfg.answer_column, cfg.response_column)


def load_examples(spec: DataSpec) -> TextDataset:
    """All examples of the run's dataset, in ``spec.task``'s format (not yet split)."""
    if spec.dataset == EMBEDDED_DATASET:
        return load_bbc_news()
    path = Path(spec.dataset).expanduser()
    try:
        if path.suffix.lower() in FORMATS:
            table = read_table(path)
            columns = HubDataset(spec.task, text=spec.text_column, label=spec.label_column,
                                 choices=spec.choices_column, answer=spec.answer_column,
                                 response=spec.response_column)
            return table_to_dataset(table, str(path), columns)
        if path.exists() or spec.dataset.startswith((".", "/", "~")):
            raise ValueError(f"--dataset {spec.dataset!r} is not a .csv / .jsonl / .parquet file")
        return load_hub_dataset(spec.dataset, spec.task, spec.text_column, spec.label_column, spec.choices_column,
                                spec.answer_column, spec.response_column)
    except ValueError as err:
        raise ConfigError(str(err)) from None


@functools.lru_cache(maxsize=4)
def load_dataset_split(spec: DataSpec | str, test_fraction: float, seed: int) -> tuple[TextDataset, TextDataset]:
    """Train/test split of the run's dataset (fixed seed, stratified, duplicates dropped)."""
    spec = DataSpec(spec) if isinstance(spec, str) else spec
    data = deduplicate(load_examples(spec))
    try:
        return train_test_split(data, test_fraction=test_fraction, seed=seed)
    except ValueError as err:
        raise ConfigError(f"--dataset {spec.dataset}: {err}") from None


def _split(cfg: RunConfig) -> tuple[TextDataset, TextDataset]:
    return load_dataset_split(DataSpec.of(cfg), cfg.test_fraction, cfg.seed)


def deduplicate(dataset: TextDataset) -> TextDataset:
    """Drop exact duplicate texts (first kept): BBC News holds 98 repeated articles,
    which would otherwise land on both sides of the split and inflate accuracy."""
    seen: set[tuple] = set()
    keep = [i for i in range(len(dataset)) if not ((key := dataset.key(i)) in seen or seen.add(key))]
    return dataset.subset(keep)


def model_spec(cfg: RunConfig) -> dict:
    """What is needed to rebuild the model (written next to the final weights)."""
    train, _ = _split(cfg)
    if model_kind(cfg) == "hf":
        head = hf_head(cfg)
        spec = {"kind": f"hf-{head}", "base_path": str(resolve_model_path(cfg)), "task": cfg.task}
        if head == "sequence-classification":
            spec["num_labels"] = train.num_classes
        if head.endswith("label-words"):
            spec["label_token_ids"] = label_token_ids(cfg)
        if cfg.lora_rank:  # the saved state holds adapters, routers and head only
            spec["lora"] = {"rank": cfg.lora_rank, "alpha": cfg.lora_alpha_value(),
                            "targets": cfg.lora_target_names(), "seed": cfg.seed}
        return spec
    spec = UpcycledSpec(base_path=str(resolve_model_path(cfg)), num_labels=train.num_classes,
                        num_experts=cfg.num_experts, top_k=cfg.top_k)
    return {"kind": "upcycled", **spec.to_dict()}


def hf_head(cfg: RunConfig) -> str:
    """How a MoE checkpoint meets the run's task.

    "sequence-classification": transformers' classification class (a new linear
    head on the last token); "label-words": the causal LM's own logits of each
    label's first token (families without a classification class, e.g. OLMoE, or
    ``--classifier label-words``); "causal-lm": the LM head itself (multiple-choice
    and causal-lm tasks). Decided from the config's model type and transformers'
    auto-class tables, not from a list of model names.
    """
    # heavy (seconds): only paths that need it pay
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
    )

    config = _hf_config(cfg)
    model_type = getattr(config, "model_type", "")
    has_lm = model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    has_head = model_type in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES
    if getattr(config, "is_encoder_decoder", False) and model_type in MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES:
        # Switch Transformers: the context goes through the encoder, what is scored
        # or trained (a label word, a choice, a response) through the decoder.
        if cfg.classifier == "head":
            raise ConfigError(f"--model {cfg.model!r} ({model_type}) is an encoder-decoder: it classifies with "
                              "label words; drop --classifier head")
        return "seq2seq" if cfg.task != "classification" else "seq2seq-label-words"
    if cfg.task != "classification" or cfg.classifier == "label-words":
        if not has_lm:
            what = f"--task {cfg.task}" if cfg.task != "classification" else "--classifier label-words"
            raise ConfigError(f"--model {cfg.model!r} ({model_type}) has no causal-LM class in transformers, "
                              f"which {what} scores text with; use a decoder-only MoE (Mixtral, Qwen-MoE, OLMoE, "
                              "DeepSeek) or --task classification --classifier head")
        return "causal-lm" if cfg.task != "classification" else "label-words"
    if has_head:
        return "sequence-classification"
    if cfg.classifier == "head" or not has_lm:
        raise ConfigError(f"--model {cfg.model!r} ({model_type}) has no sequence-classification head in "
                          "transformers" + ("; use --classifier label-words (the LM's logits of each label's "
                                            "first token)" if has_lm else ""))
    return "label-words"


def label_token_ids(cfg: RunConfig) -> list[int]:
    """First token of " <label name>" per class: the logits a label-words classifier reads.

    Two labels starting with the same token could not be told apart: that is an
    error naming them (rename the labels in the data).
    """
    tokenizer = _tokenizer(str(resolve_model_path(cfg)))
    names = label_names(cfg)
    ids = []
    for name in names:
        tokens = tokenizer(" " + name, add_special_tokens=False)["input_ids"]
        if not tokens:
            raise ConfigError(f"label {name!r} encodes to no token; rename it in --label-column")
        ids.append(int(tokens[0]))
    clash = {i for i in ids if ids.count(i) > 1}
    if clash:
        same = [n for n, i in zip(names, ids) if i in clash]
        raise ConfigError(f"labels {same} start with the same token, so label words cannot tell them apart: "
                          "rename them in the data, or use --classifier head")
    return ids


def label_names(cfg: RunConfig) -> list[str]:
    train, _ = _split(cfg)
    return list(train.label_names)


def moe_shape(cfg: RunConfig) -> tuple[int, int]:
    """(MoE layers L, routed experts per layer S) of the run's model, no weights loaded."""
    if model_kind(cfg) == "upcycle":
        _check_lora(cfg, None)
        return num_moe_layers(cfg), cfg.num_experts
    with torch.device("meta"):
        model = _hf_classifier(cfg, pretrained=False)
        access = _access_or_error(cfg, model)
        _check_lora(cfg, model)  # before any process starts
    return access.num_layers, access.num_experts


def _check_lora(cfg: RunConfig, model) -> None:
    """ConfigError for LoRA flags the model cannot honour (``model``:
    the bare HF classifier, weights not needed; None: an upcycled model)."""
    if not cfg.lora_rank:
        return
    if model is None:
        raise ConfigError(f"--lora-rank applies to Hugging Face MoE checkpoints with fused experts; --model "
                          f"{cfg.model!r} is upcycled here and fine-tuned fully: drop --lora-rank")
    if not find_fused_blocks(model):
        raise ConfigError(f"--model {cfg.model!r}: --lora-rank needs fused experts (transformers 5.x Mixtral, "
                          "Qwen-MoE, DeepSeek, ...); this layout is fine-tuned fully: drop --lora-rank")
    try:
        resolve_targets(model, cfg.lora_target_names())
    except LoraTargetError as err:
        raise ConfigError(f"--model {cfg.model!r}: {err}") from None


def num_moe_layers(cfg: RunConfig) -> int:
    """MoE layers of the run's model, without loading any weights.

    An upcycled encoder has one per transformer layer; for a MoE checkpoint the
    model is built on the meta device (no memory) and its MoE layers counted, so
    dense-only layers (e.g. DeepSeek's first_k_dense_replace) are left out.
    """
    if model_kind(cfg) == "upcycle":
        config = _hf_config(cfg) if cfg.model != EMBEDDED_MODEL else None
        if config is None:
            return int(json.loads((resolve_model_path(cfg) / "config.json").read_text())["num_hidden_layers"])
        return int(config.num_hidden_layers)
    with torch.device("meta"):
        model = _hf_classifier(cfg, pretrained=False)
    return _access_or_error(cfg, model).num_layers


def _access_or_error(cfg: RunConfig, model):
    try:
        return make_access(model)
    except NoMoELayersError as err:
        raise ConfigError(f"--model {cfg.model!r}: {err}") from None


def _hf_classifier(cfg: RunConfig, pretrained: bool) -> torch.nn.Module:
    """A MoE checkpoint behind one forward signature, ``forward(input_ids, attention_mask)``.

    Returns class logits (classification head or label words) or the LM's token
    logits (multiple-choice, causal-lm); see :func:`hf_head`.
    """
    # heavy (seconds): only paths that need it pay
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoModelForSequenceClassification

    head = hf_head(cfg)
    config = _hf_config(cfg)
    if head == "sequence-classification":
        config.num_labels = _split(cfg)[0].num_classes
    if getattr(config, "pad_token_id", None) is None:
        # Sequence classification pools the last non-pad token: it must know the pad id.
        config.pad_token_id = _tokenizer(str(resolve_model_path(cfg))).pad_token_id
    auto = {"sequence-classification": AutoModelForSequenceClassification, "label-words": AutoModelForCausalLM,
            "causal-lm": AutoModelForCausalLM}.get(head, AutoModelForSeq2SeqLM)
    path = resolve_model_path(cfg)
    torch.manual_seed(cfg.seed)  # the new classification head
    try:
        if pretrained:
            model = auto.from_pretrained(path, config=config, local_files_only=path.is_dir())
        else:
            model = auto.from_config(config)
    except ValueError as err:
        raise ConfigError(f"--model {cfg.model!r} ({config.model_type}): transformers cannot build it as "
                          f"{auto.__name__}: {str(err).splitlines()[0][:160]}") from None
    if head == "sequence-classification":
        return HFSequenceClassifier(model)
    if head == "label-words":
        return LabelWordsClassifier(model, label_token_ids(cfg))
    if head == "seq2seq-label-words":
        return Seq2SeqLabelWords(model, label_token_ids(cfg), decoder_layer_flags(model))
    if head == "seq2seq":
        return Seq2SeqAsLM(model, decoder_layer_flags(model))
    return HFCausalLM(model)


def build_model(cfg: RunConfig, pretrained: bool) -> torch.nn.Module:
    """The run's model; ``pretrained=False`` gives the architecture only (clients)."""
    _quiet_transformers(cfg)
    if model_kind(cfg) == "hf":
        if cfg.lora_rank:
            return _lora_classifier(cfg)
        model = _hf_classifier(cfg, pretrained)
        _access_or_error(cfg, model)
        return model
    _check_lora(cfg, None)
    spec = UpcycledSpec(**{k: v for k, v in model_spec(cfg).items() if k != "kind"})
    return build_upcycled_classifier(spec, pretrained=pretrained, seed=cfg.seed)


def _lora_classifier(cfg: RunConfig) -> torch.nn.Module:
    """The checkpoint with PEFT LoRA on its experts and dense targets (docs/lora.md).

    The frozen base weights never cross the wire, so every party (clients too) loads
    them from the checkpoint; the trainable state (adapters, routers, head) is seeded
    and then overwritten by the global state each round anyway.
    """
    model = _hf_classifier(cfg, pretrained=True)
    try:
        apply_lora(model, cfg.lora_rank, cfg.lora_alpha_value(), cfg.lora_target_names(), seed=cfg.seed)
    except (NoMoELayersError, LoraTargetError) as err:
        raise ConfigError(f"--model {cfg.model!r}: {err}") from None
    _access_or_error(cfg, model)
    return model


@functools.lru_cache(maxsize=2)
def _tokenizer(path: str):
    _quiet_transformers()
    from transformers import AutoTokenizer  # heavy (seconds): only paths that need it pay

    directory = Path(path)
    try:
        tokenizer = load_tokenizer(path) if directory.is_dir() else AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ConfigError(f"no usable tokenizer for {path}: save one next to the model with "
                          f"tokenizer.save_pretrained ({str(err).splitlines()[0][:160]})") from None
    if tokenizer.pad_token is None:  # decoder-only LMs often ship without one
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


@dataclass
class ClientData:
    """One client's tokenized partition."""

    partition_id: int
    batches: TensorBatches
    label_counts: list[int]

    @property
    def num_examples(self) -> int:
        return self.batches.num_samples


def client_partitions(cfg: RunConfig) -> list[list[int]]:
    train, _ = _split(cfg)
    if train.num_classes == 1:  # causal-lm without a category column: nothing to skew by
        if len(train) < cfg.clients:
            raise ConfigError(f"{len(train)} training examples cannot fill {cfg.clients} clients: "
                              "lower --clients or add data")
        return partition_iid(len(train), cfg.clients, seed=cfg.seed)
    return _partitions(tuple(train.labels), cfg.clients, cfg.alpha, cfg.seed)


@functools.lru_cache(maxsize=4)
def _partitions(labels: tuple[int, ...], clients: int, alpha: float, seed: int) -> list[list[int]]:
    return partition_dirichlet(list(labels), num_partitions=clients, alpha=alpha, seed=seed)


def encode(cfg: RunConfig, data: TextDataset) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Tensors of ``data`` in the run's task format: (inputs, labels)."""
    if data.task != cfg.task:
        raise ConfigError(f"--dataset {cfg.dataset} holds {data.task} data but --task is {cfg.task}")
    tokenizer = _tokenizer(str(resolve_model_path(cfg)))
    if cfg.task == "multiple-choice":
        return encode_choices(tokenizer, data.texts, data.choices, max_length=cfg.max_length), \
            torch.tensor(data.labels)
    if cfg.task == "causal-lm":
        enc = encode_instructions(tokenizer, data.texts, data.responses, max_length=cfg.max_length)
        return {k: v for k, v in enc.items() if k != "labels"}, enc["labels"]
    return tokenize_texts(tokenizer, data.texts, max_length=cfg.max_length), torch.tensor(data.labels)


def _batches(cfg: RunConfig, data: TextDataset, batch_size: int, shuffle: bool, seed: int = 0) -> TensorBatches:
    inputs, labels = encode(cfg, data)
    extras = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    return TensorBatches(inputs["input_ids"], inputs["attention_mask"], labels, batch_size, shuffle=shuffle,
                         seed=seed, extras=extras)


def load_client_data(cfg: RunConfig, partition_id: int) -> ClientData:
    """Tokenized training partition ``partition_id`` of ``cfg.clients``."""
    if not 0 <= partition_id < cfg.clients:
        raise ConfigError(f"partition id {partition_id} is outside 0..{cfg.clients - 1}")
    train, _ = _split(cfg)
    part = train.subset(client_partitions(cfg)[partition_id])
    batches = _batches(cfg, part, cfg.batch_size, shuffle=True, seed=cfg.seed * 1000 + partition_id)
    return ClientData(partition_id, batches, part.label_counts())


def load_test_batches(cfg: RunConfig) -> TensorBatches:
    """The held-out test set, in fixed order."""
    _, test = _split(cfg)
    return _batches(cfg, test, cfg.eval_batch_size, shuffle=False)


def endless(batches: TensorBatches):
    """Cycle through epochs forever (local steps need not align with epochs)."""
    while True:
        yield from batches


def _quiet_transformers(cfg: RunConfig | None = None) -> None:
    # Local and embedded models never touch the hub; a hub id is the user's explicit
    # request to download (when online).
    if cfg is None or cfg.model == EMBEDDED_MODEL or Path(cfg.model).expanduser().is_dir():
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging  # heavy (seconds): only paths that need it pay

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

