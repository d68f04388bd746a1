"""Local differential privacy that works with sparse expert uploads.

Flower's ``LocalDpMod`` insists that a reply carries one ArrayRecord with exactly
the keys the server sent; an HFedMoE reply uploads only the experts a client used
(plus a second record of usage statistics), so Flower's mod rejects it. This mod
does the same thing on what is actually uploaded: it clips the update (uploaded
tensor - the global tensor the client received, over the uploaded keys only) to an
L2 norm and adds Gaussian noise of std = sensitivity * sqrt(2 ln(1.25/delta)) /
epsilon to every uploaded value (Flower's noise helper). Experts that are not
uploaded are not released, so they need no noise.

Not privatised: the usage/importance statistics (``stats``: 2 x L x S numbers) and
the metrics; they reveal which experts a client's data routes to. Set
``dp_epsilon = 0`` (the default) to switch the mod off.
"""

from __future__ import annotations

import math
from logging import INFO

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message
from flwr.supercore import log
from flwr.supercore.differential_privacy import add_gaussian_noise_inplace

from hfedmoe.config import RunConfig


def dp_noise_std(sensitivity: float, epsilon: float, delta: float) -> float:
    """Gaussian mechanism: sigma = sensitivity * sqrt(2 ln(1.25 / delta)) / epsilon."""
    return sensitivity * math.sqrt(2 * math.log(1.25 / delta)) / epsilon


def privatize_upload(uploaded: ArrayRecord, received: ArrayRecord, clip: float, std: float) -> ArrayRecord:
    """Clip (uploaded - received) over the uploaded keys, add noise; a new record."""
    keys = list(uploaded.keys())
    new = [uploaded[k].numpy().astype(np.float64, copy=True) for k in keys]
    old = [received[k].numpy().astype(np.float64) for k in keys]
    # FlatClip of the update (as Flower's compute_clip_model_update, which divides
    # by zero when a client's update is exactly zero).
    norm = math.sqrt(sum(float(np.sum((n - o) ** 2)) for n, o in zip(new, old)))
    if norm > clip:
        for n, o in zip(new, old):
            n[...] = o + (n - o) * (clip / norm)
    add_gaussian_noise_inplace(new, std)
    return ArrayRecord({k: Array(np.asarray(v, dtype=uploaded[k].numpy().dtype)) for k, v in zip(keys, new)})


def sparse_local_dp_mod(msg: Message, context: Context, call_next) -> Message:
    """ClientApp mod: local DP on sparse uploads when the run config asks for it."""
    reply = call_next(msg, context)
    if reply.has_error() or "config" not in msg.content or "arrays" not in reply.content:
        return reply
    cfg = RunConfig.from_json(str(msg.content["config"]["run-config"]))
    if not cfg.dp_epsilon:
        return reply
    std = dp_noise_std(cfg.dp_clip, cfg.dp_epsilon, cfg.dp_delta)
    reply.content["arrays"] = privatize_upload(reply.content["arrays"], msg.content["arrays"], cfg.dp_clip, std)
    log(INFO, "local DP: update clipped to L2 %.3g, Gaussian noise std %.4g on %d uploaded tensors",
        cfg.dp_clip, std, len(reply.content["arrays"]))
    return reply
