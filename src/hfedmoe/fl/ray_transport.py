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

A client's received ``Array`` holds a read-only ``numpy.uint8`` array over Ray's
shared memory instead of ``bytes``: it has the same length and buffer, and
:func:`hfedmoe.fl.records.array_to_tensor`, ``Array.numpy()`` and ``len(array.data)``
read it as they read ``bytes``; the memory is released when the client drops the
received model, once loaded. The server copies each reply into ``bytes`` on arrival
(see :func:`use_out_of_band_arrays`).
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array


def _array_parts(array: Array) -> tuple[str, tuple[int, ...], str, np.ndarray]:
    """What Ray pickles for an ``Array``: its metadata and its data as a NumPy buffer
    (pickled out of band by Ray, in band by a plain pickler)."""
    return array.dtype, tuple(array.shape), array.stype, np.frombuffer(array.data, dtype=np.uint8)


def _array_viewing_parts(parts: tuple[str, tuple[int, ...], str, np.ndarray]) -> Array:
    """The ``Array`` again, its data a read-only view of the received buffer (no copy)."""
    dtype, shape, stype, data = parts
    array = Array(dtype=dtype, shape=shape, stype=stype, data=b"")
    # Array() accepts only bytes; its fields are plain attributes (Flower's own
    # inflate() sets .data the same way).
    array.data = data
    return array


def _array_copying_parts(parts: tuple[str, tuple[int, ...], str, np.ndarray]) -> Array:
    """The ``Array`` again with its data copied out of the received buffer into ``bytes``."""
    dtype, shape, stype, data = parts
    return Array(dtype=dtype, shape=shape, stype=stype, data=data.tobytes())


def use_out_of_band_arrays(receiver: str) -> None:
    """Make Ray move the ``Array`` data this process sends out of band (idempotent).

    Ray pickles a registered reducer's rebuild function with the data, so the
    *sender* decides how the receiver rebuilds an array:

    - ``receiver="view"`` (the server, sending the global model): the client reads it
      in place and drops it as soon as it is loaded into its model;
    - ``receiver="copy"`` (a client, sending its reply): the server copies each reply
      out of Ray's object store into ``bytes`` as it arrives, because it holds every
      reply of a round until aggregation; left in the store, 16 replies of the
      embedded model (3.9 GB) filled it and Ray fell back to disk-backed files.

    Called by the server app and the client app whenever Ray is loaded (Flower's
    simulation engine, from ``hfedmoe run`` or ``flwr run``). The deployment engine
    (no Ray) never calls it.
    """
    import ray.util  # only inside a Ray process (the simulation engine); elsewhere never loaded

    rebuild = {"view": _array_viewing_parts, "copy": _array_copying_parts}[receiver]
    ray.util.register_serializer(Array, serializer=_array_parts, deserializer=rebuild)
