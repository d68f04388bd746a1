"""hfedmoe: federated fine-tuning of Mixture-of-Experts models on heterogeneous clients."""

__version__ = "0.1.0"
