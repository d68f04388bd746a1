"""Plain containers shared by the data module."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["TextDataset"]


@dataclass(frozen=True)
class TextDataset:
    """A labelled text-classification dataset held in memory.

    Parameters
    ----------
    texts : list of str
        One document per example.
    labels : list of int
        Class id per example, in ``range(len(label_names))``.
    label_names : list of str
        Human-readable class names; ``label_names[i]`` names class id ``i``.
    choices : list of list of str, optional
        Multiple-choice task: the candidate answers of each example (the same
        number per example); ``labels`` then holds the index of the right one and
        ``texts`` the question/context.
    responses : list of str, optional
        Instruction (causal-LM) task: the response to each prompt in ``texts``;
        ``labels`` are then only a grouping used to split data (a category column,
        or a single group).
    """

    texts: list[str]
    labels: list[int]
    label_names: list[str]
    choices: list[list[str]] | None = None
    responses: list[str] | None = None

    def __post_init__(self) -> None:
        # Fail at construction rather than deep inside training when the
        # columns drift apart (e.g. after a buggy manual subset).
        if len(self.texts) != len(self.labels):
            raise ValueError(
                f"TextDataset needs one label per text, got {len(self.texts)} texts "
                f"and {len(self.labels)} labels."
            )
        num_classes = len(self.label_names)
        bad = [y for y in self.labels if not 0 <= y < num_classes]
        if bad:
            raise ValueError(
                f"Labels must lie in [0, {num_classes}) to match label_names; "
                f"found {sorted(set(bad))[:5]}."
            )
        for name, column in (("choices", self.choices), ("responses", self.responses)):
            if column is not None and len(column) != len(self.texts):
                raise ValueError(f"TextDataset needs one entry of {name} per text, got {len(column)} "
                                 f"for {len(self.texts)} texts.")

    @property
    def task(self) -> str:
        """The task format this dataset holds: classification, multiple-choice or causal-lm."""
        if self.choices is not None:
            return "multiple-choice"
        if self.responses is not None:
            return "causal-lm"
        return "classification"

    def key(self, i: int) -> tuple:
        """What makes example ``i`` itself (for de-duplication): its text, choices and response."""
        return (self.texts[i], tuple(self.choices[i]) if self.choices is not None else None,
                self.responses[i] if self.responses is not None else None)

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def num_classes(self) -> int:
        """Number of classes (``len(label_names)``)."""
        return len(self.label_names)

    def label_counts(self) -> list[int]:
        """Return the number of examples per class id, in class-id order."""
        counts = Counter(self.labels)
        return [counts.get(c, 0) for c in range(self.num_classes)]

    def subset(self, indices: Sequence[int]) -> TextDataset:
        """Return the examples at ``indices`` (in that order), same label names.

        Parameters
        ----------
        indices : sequence of int
            Positions into this dataset, e.g. a client partition.

        Returns
        -------
        TextDataset
            A new dataset; the original is left untouched.
        """
        return TextDataset(
            texts=[self.texts[i] for i in indices],
            labels=[self.labels[i] for i in indices],
            label_names=list(self.label_names),
            choices=None if self.choices is None else [list(self.choices[i]) for i in indices],
            responses=None if self.responses is None else [self.responses[i] for i in indices],
        )
