"""Task formats: what a batch's training loss and the test metrics are.

The trainer and the evaluator only call :meth:`Objective.loss` and
:meth:`Objective.eval_sums`; everything task-specific lives here:

- classification: cross-entropy over class logits (a classification head, or a
  causal LM's logits of each label's first token: ``hfedmoe.recipe`` builds both
  as ``model(input_ids, attention_mask) -> [B, C]``).
- multiple-choice: each example's K choices are scored by the length-normalised
  log-likelihood of the choice tokens under the causal LM; training minimises the
  cross-entropy of those K scores against the right choice, accuracy is argmax.
- causal-lm: next-token cross-entropy on response tokens only (the prompt's and
  padding's labels are -100); test metrics are perplexity and token accuracy.

The loss also returns the token mask the MoE routing of this forward pass was
recorded over ([rows, T]), which the expert scoring pools with: a multiple-choice
batch of B examples is B*K rows of the language model. An encoder-decoder wrapper
(``hfedmoe.models.hf_wrappers.Seq2SeqAsLM``) routes the context through its encoder and the
continuation through its decoder; it takes the continuation mask and reports its
own per-layer routing mask ([rows, T, L]).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

IGNORE = -100  # label of a token outside the loss (prompt, padding)


def lm_logits(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, continuation: torch.Tensor) -> torch.Tensor:
    """Token logits [rows, T, V] aligned with ``ids`` (position j predicts token j+1).

    ``continuation`` marks the tokens that are scored or trained; a model that
    treats them differently from the context (an encoder-decoder) receives it.
    """
    if getattr(model, "splits_continuation", False):
        return model(ids, mask, continuation_mask=continuation).float()  # losses in float32 (bf16 models too)
    return model(ids, mask).float()


def routing_mask(model: nn.Module, mask: torch.Tensor) -> torch.Tensor:
    """The token mask the last forward's routing was recorded over (the model's own, if it keeps one)."""
    own = getattr(model, "last_routing_mask", None)
    return own if own is not None else mask


class Objective:
    """A task format's loss and test metrics."""

    name = "classification"

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean loss of the batch, routing token mask [rows, T])."""
        logits = model(batch["input_ids"], batch["attention_mask"]).float()  # losses in float32 (bf16 models too)
        return F.cross_entropy(logits, batch["labels"]), routing_mask(model, batch["attention_mask"])

    @torch.no_grad()
    def eval_sums(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """Sums over the batch: loss_sum, correct, count (examples the accuracy counts)."""
        logits = model(batch["input_ids"], batch["attention_mask"]).float()
        return {
            "loss_sum": F.cross_entropy(logits, batch["labels"], reduction="sum").item(),
            "correct": (logits.argmax(dim=-1) == batch["labels"]).sum().item(),
            "count": len(batch["labels"]),
        }

    def metrics(self, sums: dict[str, float], examples: int) -> dict[str, float]:
        """Test metrics from summed :meth:`eval_sums` (``examples``: batches' examples)."""
        return {"accuracy": sums["correct"] / sums["count"], "loss": sums["loss_sum"] / sums["count"],
                "num_examples": examples}


class MultipleChoice(Objective):
    """Pick the choice with the highest length-normalised log-likelihood.

    Batches hold ``input_ids``, ``attention_mask`` and ``choice_mask`` of shape
    [B, K, T] (context + choice k, the choice's own tokens marked) and ``labels``
    [B] (the right choice).
    """

    name = "multiple-choice"

    def scores(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Tensor[B, K]: mean log-probability of each choice's tokens given what precedes them."""
        ids, mask, choice = batch["input_ids"], batch["attention_mask"], batch["choice_mask"]
        b, k, t = ids.shape
        logits = lm_logits(model, ids.reshape(b * k, t), mask.reshape(b * k, t), choice.reshape(b * k, t))
        # Position j's logits predict token j+1.
        targets = ids.reshape(b * k, t)[:, 1:]
        token_logp = -F.cross_entropy(logits[:, :-1].transpose(1, 2), targets, reduction="none")  # [B*K, T-1]
        counted = choice.reshape(b * k, t)[:, 1:].to(token_logp.dtype)
        mean_logp = (token_logp * counted).sum(dim=1) / counted.sum(dim=1).clamp(min=1)
        return mean_logp.reshape(b, k)

    def loss(self, model, batch):
        scores = self.scores(model, batch)
        b, k, t = batch["input_ids"].shape
        return F.cross_entropy(scores, batch["labels"]), routing_mask(model, batch["attention_mask"].reshape(b * k, t))

    @torch.no_grad()
    def eval_sums(self, model, batch):
        scores = self.scores(model, batch)
        return {
            "loss_sum": F.cross_entropy(scores, batch["labels"], reduction="sum").item(),
            "correct": (scores.argmax(dim=-1) == batch["labels"]).sum().item(),
            "count": len(batch["labels"]),
        }


class CausalLM(Objective):
    """Instruction SFT: next-token cross-entropy on response tokens only.

    Batches hold ``input_ids``/``attention_mask`` [B, T] and ``labels`` [B, T]
    (the token ids, -100 outside the response).
    """

    name = "causal-lm"

    @staticmethod
    def _token_losses(model, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = lm_logits(model, batch["input_ids"], batch["attention_mask"], batch["labels"] != IGNORE)
        targets = batch["labels"][:, 1:]
        losses = F.cross_entropy(logits[:, :-1].transpose(1, 2), targets, ignore_index=IGNORE, reduction="none")
        counted = targets != IGNORE
        return losses, counted, logits[:, :-1].argmax(dim=-1) == targets

    def loss(self, model, batch):
        losses, counted, _ = self._token_losses(model, batch)
        return (losses * counted).sum() / counted.sum().clamp(min=1), routing_mask(model, batch["attention_mask"])

    @torch.no_grad()
    def eval_sums(self, model, batch):
        losses, counted, hits = self._token_losses(model, batch)
        return {"loss_sum": (losses * counted).sum().item(), "correct": (hits & counted).sum().item(),
                "count": int(counted.sum())}

    def metrics(self, sums, examples):
        loss = sums["loss_sum"] / sums["count"]
        # "accuracy" is next-token accuracy on response tokens, so every task
        # reports one comparable higher-is-better figure next to its loss.
        return {"accuracy": sums["correct"] / sums["count"], "loss": loss,
                "perplexity": math.exp(min(loss, 50.0)), "num_examples": examples, "tokens": sums["count"]}


OBJECTIVES: dict[str, Objective] = {o.name: o for o in (Objective(), MultipleChoice(), CausalLM())}


def objective_for(task: str) -> Objective:
    """The objective of a task format (``RunConfig.task``)."""
    return OBJECTIVES[task]
