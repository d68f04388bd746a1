"""Which batches a client trains on in a given round."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import torch


def batches_from_round(data, server_round: int, local_steps: int) -> Iterator[dict[str, torch.Tensor]]:
    """Continue the client's data stream where the previous round stopped.

    ``data`` is the client's partition (anything with ``batches``: a
    :class:`~hfedmoe.data.TensorBatches` whose ``iter_epoch(e)`` yields epoch e's
    batches). Computed from the round number rather than kept in process state, so
    the run is the same whichever simulation worker serves this client.
    """
    epoch, skip = divmod((server_round - 1) * local_steps, len(data.batches))
    while True:
        yield from itertools.islice(data.batches.iter_epoch(epoch), skip, None)
        epoch, skip = epoch + 1, 0
