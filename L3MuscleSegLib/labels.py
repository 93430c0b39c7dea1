"""The class table: the one place that knows label values, names, colours and codes."""

from __future__ import annotations

from dataclasses import dataclass

BACKGROUND = 0
# DICOM private coding scheme ("99" prefix) for the study's compound abdominal-wall class,
# which has no single SNOMED CT concept.
PRIVATE_SCHEME = "99L3MS"


@dataclass(frozen=True)
class MuscleClass:
    value: int
    key: str  # machine name: CSV columns, nnU-Net dataset.json label names
    name: str  # display name: segment names, reports
    color: tuple[float, float, float]  # RGB in 0..1
    # Anatomic type code (DICOM coded concept), as in Slicer's terminology entries.
    code_scheme: str
    code_value: str
    code_meaning: str


PSOAS = MuscleClass(1, "psoas", "Psoas", (1.0, 0.0, 0.0),
                    "SCT", "64038003", "Psoas major muscle")
PARASPINAL = MuscleClass(2, "paraspinal", "Paraspinal", (0.0, 1.0, 0.0),
                         "SCT", "44947003", "Erector spinae muscle")
ABDOMINAL_WALL = MuscleClass(3, "abdominal_wall", "Abdominal wall", (0.0, 0.0, 1.0),
                             PRIVATE_SCHEME, "ABDWALL",
                             "Abdominal wall muscles (transversus, obliques, rectus)")

MUSCLE_CLASSES: tuple[MuscleClass, ...] = (PSOAS, PARASPINAL, ABDOMINAL_WALL)
LABEL_VALUES: tuple[int, ...] = (BACKGROUND,) + tuple(c.value for c in MUSCLE_CLASSES)
NNUNET_LABELS: dict[str, int] = {"background": BACKGROUND} | {
    c.key: c.value for c in MUSCLE_CLASSES
}

