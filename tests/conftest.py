"""Shared fixtures of the test suite; shared plain builders are in tests/builders.py.

Test folders mirror src/hfedmoe/ and have no ``__init__.py``: pytest's default
``prepend`` import mode puts each test file's folder, and this file's folder
(tests/), on sys.path, so ``from builders import ...`` and ``from proc_marker
import ...`` work from every folder (test basenames are unique across folders).
"""

from __future__ import annotations

import pytest

from hfedmoe.data import embedded_tokenizer_path, load_tokenizer

# builders.py asserts inside shared helpers (one_round_replies): keep pytest's
# assertion messages there, as when the helpers lived in a test module.
pytest.register_assert_rewrite("builders")


@pytest.fixture(scope="module")
def tokenizer():
    """The embedded MiniLM tokenizer, loaded once per module (offline)."""
    return load_tokenizer(embedded_tokenizer_path())


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory, tokenizer):
    """(checkpoint dir, data csv): a tiny Mixtral saved with save_pretrained and a 3-topic file."""
    from builders import save_family, write_data

    root = tmp_path_factory.mktemp("mixtral")
    return save_family("mixtral", root / "model", tokenizer), write_data(root / "data.csv")


def _single_thread():
    import torch  # the suite's collection must not pay for torch before a test needs it

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def one_thread():
    """Tiny models: one thread is fastest, and on a busy 2-core machine by far."""
    yield from _single_thread()


@pytest.fixture(scope="module")
def one_thread_per_module():
    """``one_thread`` for a whole module of tiny-model tests (``pytestmark = usefixtures``)."""
    yield from _single_thread()
