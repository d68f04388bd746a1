"""Where a run's model and tokenizer come from: the embedded MiniLM, a local checkpoint
directory or a hub id (downloaded by transformers only when the user names one)."""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

from hfedmoe.config import EMBEDDED_MODELS, ConfigError, RunConfig
from hfedmoe.data import load_tokenizer
from hfedmoe.models.upcycled import embedded_model_path


def resolve_model_path(cfg: RunConfig) -> Path:
    """Local directory of the run's model (the embedded MiniLM by default)."""
    if cfg.model in EMBEDDED_MODELS:
        return embedded_model_path()
    path = Path(cfg.model).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return path
    if path.exists() or str(cfg.model).startswith((".", "/", "~")):
        raise ConfigError(f"--model {cfg.model!r}: no config.json there; pass a directory saved with "
                          "save_pretrained, or a Hugging Face hub id")
    return Path(cfg.model)  # a hub id: downloaded by transformers when online


def quiet_transformers(cfg: RunConfig | None = None) -> None:
    # Local and embedded models never touch the hub; a hub id is the user's explicit
    # request to download (when online).
    if cfg is None or cfg.model in EMBEDDED_MODELS or Path(cfg.model).expanduser().is_dir():
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging  # heavy (seconds): only paths that need it pay

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    # bitsandbytes (the qlora extra; peft imports it whenever it is installed) warns on a
    # CPU that an optional faster kernel package is missing, and names `pip install kernels`:
    # nothing a run needs, so not on every LoRA run's stderr.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


@functools.lru_cache(maxsize=2)
def tokenizer_for(path: str):
    quiet_transformers()
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


def hf_config(cfg: RunConfig):
    from transformers import AutoConfig  # heavy (seconds): only paths that need it pay

    quiet_transformers(cfg)
    path = resolve_model_path(cfg)
    try:
        return AutoConfig.from_pretrained(path, local_files_only=path.is_dir())
    except (OSError, ValueError) as err:
        raise ConfigError(f"--model {cfg.model!r}: cannot read its config ({str(err).splitlines()[0][:200]})") \
            from None


def model_kind(cfg: RunConfig) -> str:
    """"upcycle" for a dense BERT-style encoder (made MoE here), "hf" for a MoE checkpoint."""
    if cfg.model in EMBEDDED_MODELS:
        return "upcycle"
    config = hf_config(cfg)
    return "upcycle" if getattr(config, "model_type", "") == "bert" else "hf"
