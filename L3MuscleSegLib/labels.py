"""The class table: the one place that knows label values, names, colours and codes."""

from __future__ import annotations

from dataclasses import dataclass

BACKGROUND = 0


@dataclass(frozen=True)
class MuscleClass:
    value: int
    key: str  # machine name: CSV columns, nnU-Net dataset.json label names
    name: str  # display name: segment names, reports
    color: tuple[float, float, float]  # RGB in 0..1
    # DICOM terminology (SCT), as used by Slicer's terminology entries.
    snomed_code: str
    snomed_meaning: str


PSOAS = MuscleClass(1, "psoas", "Psoas", (1.0, 0.0, 0.0), "71685009", "Psoas muscle")
PARASPINAL = MuscleClass(
    2, "paraspinal", "Paraspinal", (0.0, 1.0, 0.0), "2771000", "Paraspinal muscle"
)
ABDOMINAL_WALL = MuscleClass(
    3, "abdominal_wall", "Abdominal wall", (0.0, 0.0, 1.0), "181674001",
    "Abdominal wall muscle",
)

MUSCLE_CLASSES: tuple[MuscleClass, ...] = (PSOAS, PARASPINAL, ABDOMINAL_WALL)
LABEL_VALUES: tuple[int, ...] = (BACKGROUND,) + tuple(c.value for c in MUSCLE_CLASSES)
NNUNET_LABELS: dict[str, int] = {"background": BACKGROUND} | {
    c.key: c.value for c in MUSCLE_CLASSES
}


def muscle_class(value: int) -> MuscleClass:
    for cls in MUSCLE_CLASSES:
        if cls.value == value:
            return cls
    raise KeyError(f"No muscle class has label value {value}; valid: 1, 2, 3.")
