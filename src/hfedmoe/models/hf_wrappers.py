"""Hugging Face models behind hfedmoe's one forward signature.

Every model a run trains is called as ``forward(input_ids, attention_mask)`` (plus
``continuation_mask`` for encoder-decoders on continuation tasks) and returns class
logits or causal-LM token logits; these wrappers adapt transformers' classes to it:

- :class:`HFSequenceClassifier`: a ``*ForSequenceClassification`` model -> class logits;
- :class:`HFCausalLM`: a ``*ForCausalLM`` -> token logits [B, T, V];
- :class:`LabelWordsClassifier`: a causal LM classifying by its label words' logits;
- :class:`Seq2SeqAsLM`: an encoder-decoder seen as a causal LM over one sequence;
- :class:`Seq2SeqLabelWords`: an encoder-decoder classifying by label words.

Pure ``nn.Module`` code: nothing here knows the access layer (``hfedmoe.moe``), which
sits above the models and drives them; what an encoder-decoder wrapper needs to know
about its MoE layers (which are decoder layers) is passed in.
"""

from __future__ import annotations

import torch


class HFSequenceClassifier(torch.nn.Module):
    """``forward(input_ids, attention_mask) -> logits`` over a transformers model."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


class HFCausalLM(HFSequenceClassifier):
    """``forward(input_ids, attention_mask) -> token logits [B, T, V]`` of a causal LM."""


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position of each row's last real token (left or right padding)."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask.bool() * (positions + 1)).argmax(dim=1)


def _left_align(ids: torch.Tensor, keep: torch.Tensor, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Move each row's kept tokens to the front, in order: (ids, mask, source positions)."""
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)
    mask = keep.gather(1, order)
    return torch.where(mask, ids.gather(1, order), pad_id), mask.long(), order


class Seq2SeqAsLM(torch.nn.Module):
    """An encoder-decoder seen as a language model over one sequence.

    The batches of the multiple-choice and causal-lm tasks hold context and
    continuation in one row; here the context (the row's tokens outside
    ``continuation_mask``) is the encoder's input and the continuation is what the
    decoder produces (teacher-forced). The decoder's logits are put back where a
    causal LM's would be (the position before each continuation token), so the
    objectives score both kinds of model alike.

    Encoder and decoder layers route different tokens: ``last_routing_mask``
    ([rows, T, L]) tells the expert scoring which positions are real in each layer.

    Parameters
    ----------
    model : nn.Module
        A transformers encoder-decoder (``get_decoder()``, ``config.pad_token_id``).
    decoder_layers : list of bool
        Per sparse MoE layer, in the access layer's order, True for a decoder layer
        (:func:`hfedmoe.moe.switch.decoder_layer_flags` computes it for Switch models).
    """

    splits_continuation = True

    def __init__(self, model: torch.nn.Module, decoder_layers: list[bool]):
        super().__init__()
        self.model = model
        self._decoder_layer = list(decoder_layers)
        self.last_routing_mask: torch.Tensor | None = None

    def _run(self, ids, mask, continuation_mask, decoder_steps: int | None = None):
        pad = self.model.config.pad_token_id or 0
        start = self.model.config.decoder_start_token_id
        start = pad if start is None else start
        real = mask.bool()
        cont = continuation_mask.bool() & real
        enc_ids, enc_mask, _ = _left_align(ids, real & ~cont, pad)
        dec_tokens, dec_mask, order = _left_align(ids, cont, pad)
        ones = torch.ones_like(dec_mask[:, :1])
        dec_in = torch.cat([torch.full_like(dec_tokens[:, :1], start), dec_tokens[:, :-1]], dim=1)
        dec_in_mask = torch.cat([ones, dec_mask[:, :-1]], dim=1)
        if decoder_steps is not None:  # classification: the decoder's first step only
            dec_in_mask = torch.zeros_like(dec_in_mask)
            dec_in_mask[:, :decoder_steps] = 1
        out = self.model(input_ids=enc_ids, attention_mask=enc_mask, decoder_input_ids=dec_in,
                         decoder_attention_mask=dec_in_mask).logits
        layer_masks = [dec_in_mask if is_decoder else enc_mask for is_decoder in self._decoder_layer]
        self.last_routing_mask = torch.stack(layer_masks, dim=2)
        return out, dec_mask, order

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                continuation_mask: torch.Tensor) -> torch.Tensor:
        out, dec_mask, order = self._run(input_ids, attention_mask, continuation_mask)
        logits = torch.zeros_like(out)
        rows, steps = torch.nonzero(dec_mask.bool(), as_tuple=True)
        target = order[rows, steps] - 1  # a causal LM predicts token p at position p - 1
        ok = target >= 0
        return logits.index_put((rows[ok], target[ok]), out[rows[ok], steps[ok]])


class Seq2SeqLabelWords(Seq2SeqAsLM):
    """Classify with an encoder-decoder: the text through the encoder, the logits of
    each label's first token at the decoder's first step."""

    splits_continuation = False

    def __init__(self, model: torch.nn.Module, label_token_ids: list[int], decoder_layers: list[bool]):
        super().__init__(model, decoder_layers)
        self.register_buffer("label_token_ids", torch.tensor(label_token_ids, dtype=torch.long), persistent=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out, _, _ = self._run(input_ids, attention_mask, torch.zeros_like(attention_mask), decoder_steps=1)
        return out[:, 0, self.label_token_ids]


class LabelWordsClassifier(torch.nn.Module):
    """Classify with a causal LM: the logits of each label's first token after the text.

    Only the label tokens' rows of the LM head are evaluated, at the last real
    token of each row, so no [B, T, V] logits are built.
    """

    def __init__(self, model: torch.nn.Module, label_token_ids: list[int]):
        super().__init__()
        self.model = model
        # Not state: the ids follow from the tokenizer and the labels, rebuilt identically everywhere.
        self.register_buffer("label_token_ids", torch.tensor(label_token_ids, dtype=torch.long), persistent=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.model.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        last = hidden[torch.arange(len(hidden)), last_token_index(attention_mask)]  # [B, H]
        head = self.model.get_output_embeddings()
        bias = None if getattr(head, "bias", None) is None else head.bias[self.label_token_ids]
        return torch.nn.functional.linear(last, head.weight[self.label_token_ids], bias)
