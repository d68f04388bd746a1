"""Flower messages through Ray without copying their arrays into and out of pickles.

On Flower's simulation engine every message to a client, and every reply, crosses a
process boundary as a Ray actor call, which pickles the ``Message``. A Flower
``Array`` keeps its data as ``bytes``, and pickle copies ``bytes`` in band: the 289 MB
global model was copied into a growing pickle buffer, then into Ray's object store,
then out of it into new ``bytes`` in the worker, for every client, and the same for
every reply (about 0.55 s per client per round on the embedded model, more than half
of what the engine adds to a round; see BENCHMARKS.md, issue 8).

:func:`use_out_of_band_arrays` registers a reducer for ``Array`` with Ray's pickler
that hands the data to Ray as a NumPy buffer, which Ray's pickle-5 serializer passes
out of band: Ray copies it once into its shared-memory object store and the receiving
process reads it in place. The message, its records and Flower's path through its
link state and actors are unchanged; only how Ray moves the bytes. Only Ray's own
pickler is affected (plain ``pickle`` and Flower's protobuf path for the deployment
engine are not).

A received ``Array`` then holds a read-only ``numpy.uint8`` array over Ray's shared
memory instead of ``bytes``: it has the same length and buffer, and
:func:`hfedmoe.fl.records.array_to_tensor`, ``Array.numpy()`` and ``len(array.data)``
read it as they read ``bytes``. The shared memory is released when the last view of it
is dropped (the client drops the received model once loaded; the server drops the
replies after aggregating them).
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array


def _array_parts(array: Array) -> tuple[str, tuple[int, ...], str, np.ndarray]:
    """What Ray pickles for an ``Array``: its metadata and its data as a NumPy buffer
    (pickled out of band by Ray, in band by a plain pickler)."""
    return array.dtype, tuple(array.shape), array.stype, np.frombuffer(array.data, dtype=np.uint8)


def _array_from_parts(parts: tuple[str, tuple[int, ...], str, np.ndarray]) -> Array:
    """The ``Array`` again, its data a view of the received buffer (no copy)."""
    dtype, shape, stype, data = parts
    array = Array(dtype=dtype, shape=shape, stype=stype, data=b"")
    # Array() accepts only bytes; its fields are plain attributes (Flower's own
    # inflate() sets .data the same way).
    array.data = data
    return array


def use_out_of_band_arrays() -> None:
    """Make Ray move Flower ``Array`` data out of band in this process (idempotent).

    Called by the server app and the client app whenever Ray is loaded (Flower's
    simulation engine, from ``hfedmoe run`` or ``flwr run``): the server's process
    pickles the messages to the clients, each Ray worker pickles its replies. The
    deployment engine (no Ray) never calls it.
    """
    import ray.util

    ray.util.register_serializer(Array, serializer=_array_parts, deserializer=_array_from_parts)
