"""Bring-your-own classification data: local csv / jsonl / parquet files.

Labels are discovered from the data (sorted distinct values -> ids 0..C-1), so a
column of strings ("sport", "tech") or of integers both work. Every problem a user
can cause is one ValueError naming the file, the column and the fix.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from hfedmoe.data.types import TextDataset

FORMATS = {".csv": "csv", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def load_text_file(path: str | Path, text_column: str = "text", label_column: str = "label") -> TextDataset:
    """Read a labelled text file into a :class:`TextDataset`.

    Parameters
    ----------
    path : str or Path
        A .csv, .jsonl (one JSON object per line) or .parquet file.
    text_column, label_column : str
        Columns holding the text and the class label.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"dataset file {path} does not exist")
    kind = FORMATS.get(path.suffix.lower())
    if kind is None:
        raise ValueError(f"{path}: unsupported file type {path.suffix!r}; use .csv, .jsonl or .parquet")
    import datasets  # local files only: nothing is fetched from a hub

    datasets.disable_progress_bars()
    reader = {"csv": datasets.Dataset.from_csv, "json": datasets.Dataset.from_json,
              "parquet": datasets.Dataset.from_parquet}[kind]
    try:
        table = reader(str(path))
    except Exception as err:  # malformed file: report it as the user's file problem
        if "corresponds to no data" in str(err):  # a header and nothing else
            raise ValueError(f"{path} holds no rows") from None
        raise ValueError(f"{path}: cannot read it as {kind}: {str(err).splitlines()[0][:200]}") from None
    if len(table) == 0:
        raise ValueError(f"{path} holds no rows")
    for column, flag in ((text_column, "--text-column"), (label_column, "--label-column")):
        if column not in table.column_names:
            raise ValueError(f"{path} has no column {column!r} (columns: {', '.join(table.column_names)}); "
                             f"set {flag}")
    texts, raw_labels = table[text_column], table[label_column]
    for i, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{path}: row {i} of column {text_column!r} is {text!r}, not a non-empty text")
    for i, label in enumerate(raw_labels):
        if label is None or isinstance(label, (float, list, dict)):
            raise ValueError(f"{path}: row {i} of column {label_column!r} is {label!r}; labels must be "
                             "strings or integers")
    names = sorted({str(label) for label in raw_labels},
                   key=lambda s: (0, int(s)) if s.lstrip("-").isdigit() else (1, s))
    if len(names) < 2:
        raise ValueError(f"{path}: column {label_column!r} has a single class ({names[0]!r}); "
                         "classification needs at least two")
    counts = Counter(str(label) for label in raw_labels)
    lonely = sorted(name for name, n in counts.items() if n < 2)
    if lonely:
        raise ValueError(f"{path}: class(es) {lonely[:5]} of column {label_column!r} have a single example; "
                         "a stratified train/test split needs at least two per class")
    ids = {name: i for i, name in enumerate(names)}
    return TextDataset(texts=list(texts), labels=[ids[str(label)] for label in raw_labels], label_names=names)
