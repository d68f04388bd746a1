"""The model of a run: how a checkpoint meets the task (new head, label words, LM,
encoder-decoder), upcycling a dense encoder, LoRA, and the MoE shape, all decided from
the config and transformers' auto classes, never from a list of model names."""

from __future__ import annotations

import json

import torch

from hfedmoe.config import EMBEDDED_MODELS, SPECIALISED_MODEL, ConfigError, RunConfig
from hfedmoe.models.hf_wrappers import (
    HFCausalLM,
    HFSequenceClassifier,
    LabelWordsClassifier,
    Seq2SeqAsLM,
    Seq2SeqLabelWords,
)
from hfedmoe.models.upcycled import UpcycledSpec, build_upcycled_classifier
from hfedmoe.moe import NoMoELayersError, make_access
from hfedmoe.moe.fused import find_fused_blocks
from hfedmoe.moe.lora import LoraTargetError, apply_lora, resolve_targets
from hfedmoe.moe.switch import decoder_layer_flags
from hfedmoe.recipe.data import label_names, num_labels
from hfedmoe.recipe.device import check_runtime, run_device, run_dtype
from hfedmoe.recipe.sources import hf_config, model_kind, quiet_transformers, resolve_model_path, tokenizer_for
from hfedmoe.recipe.specialise import load_specialised


def model_spec(cfg: RunConfig) -> dict:
    """What is needed to rebuild the model (written next to the final weights)."""
    if model_kind(cfg) == "hf":
        head = hf_head(cfg)
        spec = {"kind": f"hf-{head}", "base_path": str(resolve_model_path(cfg)), "task": cfg.task}
        if head == "sequence-classification":
            spec["num_labels"] = num_labels(cfg)
        if head.endswith("label-words"):
            spec["label_token_ids"] = label_token_ids(cfg)
        if cfg.lora_rank:  # the saved state holds adapters, routers and head only
            spec["lora"] = {"rank": cfg.lora_rank, "alpha": cfg.lora_alpha_value(),
                            "targets": cfg.lora_target_names(), "seed": cfg.seed}
        return spec
    spec = UpcycledSpec(base_path=str(resolve_model_path(cfg)), num_labels=num_labels(cfg),
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

    config = hf_config(cfg)
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
    tokenizer = tokenizer_for(str(resolve_model_path(cfg)))
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


def moe_shape(cfg: RunConfig) -> tuple[int, int]:
    """(MoE layers L, routed experts per layer S) of the run's model, no weights loaded;
    ConfigError for settings this machine cannot honour (device, dtype, 4-bit)."""
    check_runtime(cfg)
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
        config = hf_config(cfg) if cfg.model not in EMBEDDED_MODELS else None
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
    config = hf_config(cfg)
    if head == "sequence-classification":
        config.num_labels = num_labels(cfg)
    if getattr(config, "pad_token_id", None) is None:
        # Sequence classification pools the last non-pad token: it must know the pad id.
        config.pad_token_id = tokenizer_for(str(resolve_model_path(cfg))).pad_token_id
    auto = {"sequence-classification": AutoModelForSequenceClassification, "label-words": AutoModelForCausalLM,
            "causal-lm": AutoModelForCausalLM}.get(head, AutoModelForSeq2SeqLM)
    path = resolve_model_path(cfg)
    torch.manual_seed(cfg.seed)  # the new classification head
    dtype = run_dtype(cfg)
    try:
        if pretrained:
            model = auto.from_pretrained(path, config=config, local_files_only=path.is_dir(), dtype=dtype,
                                         **_quantization(cfg, dtype))
            if cfg.load_in_4bit and run_device(cfg).type == "cpu":
                _keep_4bit_training_layout(model)
        else:
            model = auto.from_config(config, dtype=dtype)
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
    """The run's model on the run's device in the run's dtype (:mod:`hfedmoe.recipe.device`);
    ``pretrained=False`` gives the architecture only (clients: the global state is loaded
    into it every round)."""
    quiet_transformers(cfg)
    check_runtime(cfg)
    if model_kind(cfg) == "hf":
        if cfg.lora_rank:
            model = _lora_classifier(cfg)
        else:
            model = _hf_classifier(cfg, pretrained)
            _access_or_error(cfg, model)
    else:
        _check_lora(cfg, None)
        spec = UpcycledSpec(**{k: v for k, v in model_spec(cfg).items() if k != "kind"})
        model = build_upcycled_classifier(spec, pretrained=pretrained, seed=cfg.seed)
        if pretrained and cfg.model == SPECIALISED_MODEL:
            load_specialised(model, cfg.num_experts, cfg.top_k)  # built (trained) on first use only
        model = model.to(run_dtype(cfg))
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(cfg, model)
    if not cfg.load_in_4bit:  # a quantized model was placed on its device as it loaded
        model.to(run_device(cfg))
    return model


def _quantization(cfg: RunConfig, dtype: torch.dtype) -> dict:
    """from_pretrained's 4-bit arguments for --load-in-4bit (QLoRA), else none.

    bitsandbytes quantizes ``nn.Linear`` layers only (attention, shared experts, dense
    MLPs); the fused 3-D expert tensors of transformers 5.x are not ``nn.Linear`` and
    stay in ``dtype``, with LoRA on them like every other adapter.
    """
    if not cfg.load_in_4bit:
        return {}
    from transformers import BitsAndBytesConfig  # heavy: only the 4-bit path pays for it

    # The router, the head and the label-word path must stay exact: never quantized.
    skip = ["lm_head", "score", "classifier", "gate", "router"]
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
                               bnb_4bit_use_double_quant=True, llm_int8_skip_modules=skip)
    return {"quantization_config": quant, "device_map": {"": str(run_device(cfg))}}


def _keep_4bit_training_layout(model: torch.nn.Module) -> None:
    """4-bit on a CPU (the tests' path, see ALLOW_CPU_4BIT_ENV): keep every bitsandbytes
    Linear4bit in the layout training uses.

    On a CPU with AVX512-BF16, bitsandbytes 0.50 repacks a Linear4bit's weight for an
    inference kernel at its first forward in eval mode without gradients (an evaluation),
    and keeps it repacked. That fails outright when in_features is not a multiple of the
    quantization block (64), and afterwards every TRAINING forward runs the inference kernel,
    which has no backward: no gradient passes the layer (torch only warns), so the adapters
    below it stop learning. Measured on the tests' tiny Mixtral and on a bare Linear4bit.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):  # bitsandbytes.nn.Linear4bit
            module.support_avx512bf16_for_cpu = False


def enable_gradient_checkpointing(cfg: RunConfig, model: torch.nn.Module) -> None:
    """transformers' own gradient checkpointing on the model's backbone: every decoder
    (or encoder) layer keeps only its input and runs its forward again inside the backward.

    Non-reentrant (``use_reentrant=False``), which is what the rest of training needs:
    reentrant checkpointing refuses ``backward(inputs=...)`` (how the loop limits the
    backward to the selected experts), and needs the input embeddings to require grad
    when the base is frozen (LoRA). The recomputed forward fires the routing hooks again
    (same routing: same inputs, dropout replayed from the saved RNG state) and runs the
    deferred experts' forward again, after the selection was set; both are tested
    (tests/recipe/test_gradient_checkpointing.py). The upcycled encoder's backbone is a
    transformers BertModel and is checkpointed the same way.
    """
    backbone = next((m for m in model.modules() if hasattr(m, "gradient_checkpointing_enable")), None)
    if backbone is None or not getattr(backbone, "supports_gradient_checkpointing", False):
        raise ConfigError(f"--gradient-checkpointing: --model {cfg.model!r} "
                          f"({type(backbone or model).__name__}) does not support transformers' gradient "
                          "checkpointing: drop the flag")
    kwargs = {"use_reentrant": False}
    if hasattr(backbone, "activation_checkpointing_enable"):  # the newer name; the old one warns
        backbone.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if getattr(backbone.config, "use_cache", None):  # training never uses the KV cache; a checkpointed
        backbone.config.use_cache = False            # layer would drop it anyway, with a warning


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
