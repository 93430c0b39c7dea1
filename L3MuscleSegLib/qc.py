"""Quality control from fold agreement: where the cross-validation folds disagree, look.

Each fold of an nnU-Net ensemble is a separately trained model. On slices like those it
was trained on they agree closely; on unusual input (wrong vertebral level, artefacts, a
cropped field of view, contrast the model never saw) they drift apart. Agreement is
measured on the per-fold label maps:

* **class Dice**: for each muscle class, the mean over all pairs of folds of the Dice
  coefficient between their masks of that class. A class no fold segments has Dice 1
  between every pair (the folds agree it is absent).
* **foreground agreement**: of the pixels that any fold labels as muscle, the share on
  which all folds give the same label (1 when no fold labels any muscle).
* **score**: the *minimum* class Dice. The weakest class governs because one class failing
  (usually the small psoas) is what a reader must check, and a mean would hide it.

``review_recommended`` is true when the score is below a threshold, by default
:data:`DEFAULT_REVIEW_THRESHOLD` = 0.90. Between well-trained nnU-Net folds on
in-distribution L3 slices the class Dice is typically ≥ 0.95, so values below 0.90 point to
input the model is unsure about. The threshold is a starting point, to be calibrated on
the study's validation set. With a single fold there is nothing to compare: the score is
None, ``reason`` says why, and no review is flagged on these grounds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import combinations
from types import MappingProxyType

import numpy as np

from .errors import InputError
from .labels import MUSCLE_CLASSES

DEFAULT_REVIEW_THRESHOLD = 0.90


@dataclass(frozen=True)
class QCScore:
    """Fold agreement of one segmented slice."""

    n_folds: int
    class_dice: Mapping[int, float] = field(default_factory=dict)  # class value → mean Dice
    foreground_agreement: float | None = None
    score: float | None = None  # min of class_dice; None when it cannot be computed
    reason: str = ""  # why score is None

    def review_recommended(self, threshold: float = DEFAULT_REVIEW_THRESHOLD) -> bool:
        """True when the folds agree less than ``threshold`` (0..1) on some class."""
        if not 0.0 <= threshold <= 1.0:
            raise InputError(f"QC threshold must be between 0 and 1; got {threshold}.")
        return self.score is not None and self.score < threshold

    def to_dict(self, threshold: float = DEFAULT_REVIEW_THRESHOLD) -> dict:
        """JSON-ready form, for reports and the Slicer panel."""
        return {
            "n_folds": self.n_folds,
            "score": self.score,
            "class_dice": {c.key: self.class_dice[c.value] for c in MUSCLE_CLASSES
                           if c.value in self.class_dice},
            "foreground_agreement": self.foreground_agreement,
            "review_recommended": self.review_recommended(threshold),
            "review_threshold": threshold,
            "reason": self.reason,
        }

    @property
    def summary(self) -> str:
        """One line, e.g. "fold agreement 0.93 (psoas 0.93, paraspinal 0.97, …)"."""
        if self.score is None:
            return f"fold agreement not available: {self.reason}"
        per_class = ", ".join(f"{c.name.lower()} {self.class_dice[c.value]:.2f}"
                              for c in MUSCLE_CLASSES)
        return f"fold agreement {self.score:.2f} ({per_class})"


def fold_agreement(fold_labels: Sequence[np.ndarray]) -> QCScore:
    """Agreement between per-fold label maps (same shape, our class values 0..3)."""
    maps = [np.asarray(m) for m in fold_labels]
    if not maps:
        raise InputError("fold_agreement needs the label map of at least one fold; got none.")
    shapes = {m.shape for m in maps}
    if len(shapes) > 1:
        raise InputError(f"Fold label maps differ in shape: {sorted(shapes)}. Pass maps of "
                         "one slice, all on the same grid.")
    if len(maps) == 1:
        return QCScore(1, reason="a single fold was used; agreement needs at least two")
    class_dice = {c.value: _mean_pairwise_dice([m == c.value for m in maps])
                  for c in MUSCLE_CLASSES}
    return QCScore(
        n_folds=len(maps),
        class_dice=MappingProxyType(class_dice),
        foreground_agreement=_foreground_agreement(maps),
        score=min(class_dice.values()),
    )


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice coefficient of two boolean masks; 1.0 when both are empty."""
    total = int(np.count_nonzero(a)) + int(np.count_nonzero(b))
    return 1.0 if total == 0 else 2.0 * int(np.count_nonzero(a & b)) / total


def _mean_pairwise_dice(masks: list[np.ndarray]) -> float:
    return float(np.mean([dice(a, b) for a, b in combinations(masks, 2)]))


def _foreground_agreement(maps: list[np.ndarray]) -> float:
    union = np.any([m > 0 for m in maps], axis=0)
    n = int(np.count_nonzero(union))
    if n == 0:
        return 1.0
    unanimous = np.all([m == maps[0] for m in maps[1:]], axis=0)
    return int(np.count_nonzero(unanimous & union)) / n
