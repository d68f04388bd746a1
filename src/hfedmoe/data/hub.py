"""Hugging Face hub datasets, mapped onto the three task formats.

A hub id is the user's explicit request to download (when online). Each known
dataset maps its own fields onto :mod:`hfedmoe.data.files`' loaders, so a hub
dataset and a local file with the same columns become the same
:class:`~hfedmoe.data.types.TextDataset`. Other hub ids work too when the user
names the columns (``--text-column`` and friends).
"""

from __future__ import annotations

from dataclasses import dataclass

from hfedmoe.data.files import choices_from_table, classification_from_table, instructions_from_table
from hfedmoe.data.types import TextDataset


@dataclass(frozen=True)
class HubDataset:
    """How one hub dataset's fields map onto a task format."""

    task: str
    split: str = "train"
    subset: str | None = None  # the dataset's config name (MMLU: "all")
    text: str = "text"
    label: str = "label"
    choices: str = "choices"
    answer: str = "answer"
    response: str = "response"


KNOWN: dict[str, HubDataset] = {
    "ag_news": HubDataset("classification", text="text", label="label"),
    "fancyzhx/ag_news": HubDataset("classification", text="text", label="label"),
    "piqa": HubDataset("multiple-choice", text="goal", choices="sol1,sol2", answer="label"),
    "ybisk/piqa": HubDataset("multiple-choice", text="goal", choices="sol1,sol2", answer="label"),
    "hellaswag": HubDataset("multiple-choice", text="ctx", choices="endings", answer="label"),
    "Rowan/hellaswag": HubDataset("multiple-choice", text="ctx", choices="endings", answer="label"),
    # MMLU's train split is the small auxiliary set; "test" is the 14k questions.
    "cais/mmlu": HubDataset("multiple-choice", split="test", subset="all", text="question", choices="choices",
                            answer="answer"),
}


def hub_spec(dataset_id: str, task: str) -> HubDataset | None:
    """The known field mapping of ``dataset_id`` for ``task`` (None: user-named columns)."""
    spec = KNOWN.get(dataset_id)
    if spec is None:
        return None
    if spec.task != task:
        raise ValueError(f"--dataset {dataset_id} is a {spec.task} dataset; run it with --task {spec.task}")
    return spec


def fetch_table(dataset_id: str, subset: str | None, split: str):
    """Download (or read from the local datasets cache) one split of a hub dataset."""
    import datasets  # heavy (pyarrow, seconds): only a hub dataset pays for it

    try:
        return datasets.load_dataset(dataset_id, subset, split=split)
    except Exception as err:  # offline, unknown id, gated dataset, ...
        raise ValueError(f"--dataset {dataset_id!r}: cannot load it from the Hugging Face hub "
                         f"({type(err).__name__}: {str(err).splitlines()[0][:160]}); when offline pass a local "
                         ".csv / .jsonl / .parquet file instead") from None


def load_hub_dataset(dataset_id: str, task: str, text_column: str, label_column: str, choices_column: str,
                     answer_column: str, response_column: str) -> TextDataset:
    """A hub dataset as a :class:`TextDataset` in ``task``'s format.

    Known ids use their standard fields; any other id uses the given columns.
    """
    spec = hub_spec(dataset_id, task) or HubDataset(task, text=text_column, label=label_column,
                                                    choices=choices_column, answer=answer_column,
                                                    response=response_column)
    table = fetch_table(dataset_id, spec.subset, spec.split)
    return table_to_dataset(table, f"hub dataset {dataset_id}", spec)


def table_to_dataset(table, source: str, spec: HubDataset, site: bool = False) -> TextDataset:
    """Map a ``datasets.Dataset`` onto ``spec.task``'s format (``site``: one client's own
    file, see :func:`~hfedmoe.data.files.classification_from_table`)."""
    if spec.task == "multiple-choice":
        return choices_from_table(table, source, spec.text, spec.choices, spec.answer)
    if spec.task == "causal-lm":
        return instructions_from_table(table, source, spec.text, spec.response, spec.label, site=site)
    names = None
    feature = getattr(table, "features", {}).get(spec.label) if hasattr(table, "features") else None
    if feature is not None and hasattr(feature, "names"):  # a ClassLabel: keep the dataset's own names
        names = list(feature.names)
    return classification_from_table(table, source, spec.text, spec.label, label_names=names, site=site)
