"""Model definitions: plain ``nn.Module`` code, no knowledge of the access layer.

- :mod:`hfedmoe.models.moe_block`: the separate-expert MoE feed-forward block
  (``MoEFeedForward``) and its deferred expert backward;
- :mod:`hfedmoe.models.upcycled`: a BERT-style encoder sparse-upcycled into a MoE
  text classifier (the embedded default model);
- :mod:`hfedmoe.models.hf_wrappers`: transformers models behind one forward signature.

Dependency direction: ``hfedmoe.moe`` (the access layer) imports these modules to
drive them; nothing here imports ``hfedmoe.moe``.
"""
