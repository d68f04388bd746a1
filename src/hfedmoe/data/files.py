"""Bring-your-own data: local csv / jsonl / parquet files, in three task formats.

- classification: a text column and a label column. Labels are discovered from
  the data (sorted distinct values -> ids 0..C-1), so strings ("sport") and
  integers both work.
- multiple-choice: a question column, the choices (one list column, a JSON list
  in a csv cell, or several columns "sol1,sol2") and an answer column (0-based
  index, a letter A/B/C..., or the text of the right choice).
- causal-lm: a prompt column and a response column (instruction SFT); an
  optional category column only groups examples for the non-IID split.

Every problem a user can cause is one ValueError naming the file, the column
and the fix. :mod:`hfedmoe.data.hub` maps hub datasets onto the same functions.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from hfedmoe.data.types import TextDataset

FORMATS = {".csv": "csv", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def read_table(path: str | Path):
    """A local data file as a ``datasets.Dataset`` (nothing is fetched from a hub)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"dataset file {path} does not exist")
    kind = FORMATS.get(path.suffix.lower())
    if kind is None:
        raise ValueError(f"{path}: unsupported file type {path.suffix!r}; use .csv, .jsonl or .parquet")
    import datasets  # heavy (pyarrow, seconds): only reading a data file pays for it

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
    return table


def load_text_file(path: str | Path, text_column: str = "text", label_column: str = "label") -> TextDataset:
    """Read a labelled text file into a :class:`TextDataset` (classification).

    Parameters
    ----------
    path : str or Path
        A .csv, .jsonl (one JSON object per line) or .parquet file.
    text_column, label_column : str
        Columns holding the text and the class label.
    """
    return classification_from_table(read_table(path), str(Path(path).expanduser()), text_column, label_column)


def load_choice_file(path: str | Path, question_column: str, choices_column: str, answer_column: str) -> TextDataset:
    """Read a multiple-choice file (see the module docstring for the column formats)."""
    return choices_from_table(read_table(path), str(Path(path).expanduser()), question_column, choices_column,
                              answer_column)


def load_instruction_file(path: str | Path, prompt_column: str, response_column: str,
                          group_column: str | None = None) -> TextDataset:
    """Read a prompt/response file for instruction fine-tuning (causal-lm)."""
    return instructions_from_table(read_table(path), str(Path(path).expanduser()), prompt_column, response_column,
                                   group_column)


def _require_columns(table, source: str, columns: dict[str, str]) -> None:
    for column, flag in columns.items():
        if column not in table.column_names:
            raise ValueError(f"{source} has no column {column!r} (columns: {', '.join(table.column_names)}); "
                             f"set {flag}")


def _texts(table, source: str, column: str) -> list[str]:
    values = table[column]
    for i, text in enumerate(values):
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{source}: row {i} of column {column!r} is {text!r}, not a non-empty text")
    return list(values)


def label_sort_key(name: str) -> tuple:
    """Class names in id order: integers numerically, then strings alphabetically."""
    return (0, int(name)) if name.lstrip("-").isdigit() else (1, name)


def _class_ids(raw_labels, source: str, column: str, min_classes: int = 2,
               min_per_class: int = 2) -> tuple[list[int], list[str]]:
    for i, label in enumerate(raw_labels):
        if label is None or isinstance(label, (float, list, dict)):
            raise ValueError(f"{source}: row {i} of column {column!r} is {label!r}; labels must be "
                             "strings or integers")
    names = sorted({str(label) for label in raw_labels}, key=label_sort_key)
    if len(names) < min_classes:
        raise ValueError(f"{source}: column {column!r} has a single class ({names[0]!r}); "
                         "classification needs at least two")
    counts = Counter(str(label) for label in raw_labels)
    lonely = sorted(name for name, n in counts.items() if n < min_per_class)
    if lonely:
        raise ValueError(f"{source}: class(es) {lonely[:5]} of column {column!r} have a single example; "
                         "a stratified train/test split needs at least two per class")
    ids = {name: i for i, name in enumerate(names)}
    return [ids[str(label)] for label in raw_labels], names


def classification_from_table(table, source: str, text_column: str, label_column: str,
                              label_names: list[str] | None = None, site: bool = False) -> TextDataset:
    """Text + class label columns -> classification dataset.

    ``label_names`` (e.g. a hub dataset's ClassLabel names) names integer labels
    0..C-1; without it the names are the distinct values found. ``site``: one
    client's own file, which may hold a single class or a class with one example
    (a skewed site; the federation's label set is agreed across sites).
    """
    _require_columns(table, source, {text_column: "--text-column", label_column: "--label-column"})
    texts = _texts(table, source, text_column)
    raw = table[label_column]
    if label_names is not None:
        bad = [y for y in raw if not isinstance(y, int) or not 0 <= y < len(label_names)]
        if bad:
            raise ValueError(f"{source}: column {label_column!r} holds {bad[0]!r}, not a class id of {label_names}")
        return TextDataset(texts=texts, labels=list(raw), label_names=list(label_names))
    labels, names = _class_ids(raw, source, label_column, min_classes=1 if site else 2,
                               min_per_class=1 if site else 2)
    return TextDataset(texts=texts, labels=labels, label_names=names)


def relabel(dataset: TextDataset, label_names: list[str], source: str) -> TextDataset:
    """``dataset`` with its class ids renumbered to ``label_names`` (the federation's
    agreed label set), so that class i means the same on every site."""
    ids = {name: i for i, name in enumerate(label_names)}
    unknown = sorted(set(dataset.label_names) - set(ids), key=label_sort_key)
    if unknown:
        raise ValueError(f"{source} holds label(s) {unknown[:5]} outside the run's label set {label_names[:20]}: "
                         "add them to the run config's labels, or drop those rows")
    remap = [ids[name] for name in dataset.label_names]
    return TextDataset(texts=list(dataset.texts), labels=[remap[y] for y in dataset.labels],
                       label_names=list(label_names), choices=dataset.choices, responses=dataset.responses)


def _choice_lists(table, source: str, choices_column: str) -> list[list[str]]:
    columns = [c.strip() for c in choices_column.split(",") if c.strip()]
    _require_columns(table, source, {c: "--choices-column" for c in columns})
    if len(columns) > 1:  # one column per choice (PIQA's sol1, sol2)
        rows = [list(values) for values in zip(*(table[c] for c in columns))]
    else:
        rows = []
        for i, value in enumerate(table[columns[0]]):
            if isinstance(value, str):  # a csv cell: a JSON list
                try:
                    value = json.loads(value)
                except json.JSONDecodeError:
                    raise ValueError(f"{source}: row {i} of column {columns[0]!r} is {value[:60]!r}; a csv cell "
                                     "must hold a JSON list of choices, e.g. [\"yes\", \"no\"], or give several "
                                     "columns with --choices-column a,b") from None
            if not isinstance(value, (list, tuple)):
                raise ValueError(f"{source}: row {i} of column {columns[0]!r} is {value!r}, not a list of choices")
            rows.append(list(value))
    for i, choices in enumerate(rows):
        if len(choices) < 2 or any(not isinstance(c, str) or not c.strip() for c in choices):
            raise ValueError(f"{source}: row {i} of {choices_column!r} has choices {choices!r}; each example "
                             "needs at least two non-empty text choices")
    counts = sorted({len(c) for c in rows})
    if len(counts) != 1:
        raise ValueError(f"{source}: examples have different numbers of choices {counts} in {choices_column!r}; "
                         "keep one number of choices per dataset (split the file by it)")
    return rows


def _answer_index(value, choices: list[str], source: str, row: int, column: str) -> int:
    k = len(choices)
    if isinstance(value, bool) or value is None or isinstance(value, float):
        index = -1
    elif isinstance(value, int):
        index = value
    else:
        text = str(value).strip()
        if text.lstrip("-").isdigit():
            index = int(text)
        elif len(text) == 1 and text.upper() in "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[:k]:
            index = "ABCDEFGHIJKLMNOPQRSTUVWXYZ".index(text.upper())
        else:
            index = choices.index(text) if text in choices else -1
    if not 0 <= index < k:
        raise ValueError(f"{source}: row {row} of column {column!r} is {value!r}; an answer is a 0-based index "
                         f"below {k}, a letter A-{'ABCDEFGHIJKLMNOPQRSTUVWXYZ'[k - 1]}, or the text of a choice")
    return index


def choices_from_table(table, source: str, question_column: str, choices_column: str,
                       answer_column: str) -> TextDataset:
    """Question + choices + answer columns -> multiple-choice dataset.

    The labels are the right choice's index; label names are the letters A, B, ...
    """
    _require_columns(table, source, {question_column: "--text-column", answer_column: "--answer-column"})
    questions = _texts(table, source, question_column)
    choices = _choice_lists(table, source, choices_column)
    answers = [_answer_index(v, c, source, i, answer_column) for i, (v, c) in enumerate(zip(table[answer_column],
                                                                                            choices))]
    letters = list("ABCDEFGHIJKLMNOPQRSTUVWXYZ"[:len(choices[0])])
    return TextDataset(texts=questions, labels=answers, label_names=letters, choices=choices)


def instructions_from_table(table, source: str, prompt_column: str, response_column: str,
                            group_column: str | None = None, site: bool = False) -> TextDataset:
    """Prompt + response columns -> causal-LM (instruction SFT) dataset.

    ``group_column`` (a category, when the file has it) drives the non-IID split;
    without it every example is in one group.
    """
    _require_columns(table, source, {prompt_column: "--text-column", response_column: "--response-column"})
    prompts = _texts(table, source, prompt_column)
    responses = _texts(table, source, response_column)
    if group_column and group_column in table.column_names:
        labels, names = _class_ids(table[group_column], source, group_column, min_classes=1,
                                   min_per_class=1 if site else 2)
    else:
        labels, names = [0] * len(prompts), ["all"]
        if len(prompts) < 2 and not site:
            raise ValueError(f"{source} holds {len(prompts)} example; a train/test split needs at least two")
    return TextDataset(texts=prompts, labels=labels, label_names=names, responses=responses)
