"""A real MRML scene without the Slicer application, wired as trame-slicer's SlicerApp does.

``new_mrml_app()`` builds a vtkMRMLScene with the application logic and the Colors,
Volumes, Segmentations, Tables and Subject Hierarchy module logics (all real C++ logic
from the slicer-core wheel), and sets ``slicer.mrmlScene``. ``slicer.modules.<name>.logic()``
is provided for the few ``slicer.util`` helpers that look logics up there (e.g.
``updateSegmentBinaryLabelmapFromArray``). The Terminologies logic is left out: the wheel
ships none of its JSON files, and serializing a terminology entry needs no logic instance.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core (MRML) is not installed")
from vtkmodules.vtkCommonCore import vtkCollection  # noqa: E402

MODULE_DIR = Path(__file__).resolve().parents[1] / "L3MuscleSeg"
if str(MODULE_DIR) not in sys.path:
    sys.path.insert(0, str(MODULE_DIR))
# The module under test: L3MuscleSeg/ is a Slicer module folder, not a package.
mrml_logic = importlib.import_module("L3MuscleSegMRML")


@dataclass
class MRMLApp:
    scene: object
    app_logic: object
    volumes: object
    segmentations: object
    tables: object
    subject_hierarchy: object


def new_mrml_app() -> MRMLApp:
    """A fresh scene with registered module logics; also becomes ``slicer.mrmlScene``."""
    scene = slicer.vtkMRMLScene()
    app_logic = slicer.vtkSlicerApplicationLogic()
    app_logic.SetMRMLScene(scene)
    app_logic.GetColorLogic().SetMRMLScene(scene)
    app_logic.SetSliceLogics(vtkCollection())
    app_logic.SetViewLogics(vtkCollection())
    app = MRMLApp(
        scene, app_logic,
        volumes=_module_logic(slicer.vtkSlicerVolumesLogic(), scene, app_logic, "Volumes"),
        segmentations=_module_logic(slicer.vtkSlicerSegmentationsModuleLogic(), scene,
                                    app_logic, "Segmentations"),
        tables=_module_logic(slicer.vtkSlicerTablesLogic(), scene, app_logic, "Tables"),
        subject_hierarchy=_module_logic(slicer.vtkSlicerSubjectHierarchyModuleLogic(), scene,
                                        app_logic, "SubjectHierarchy"),
    )
    _module_logic(slicer.vtkMRMLColorLogic(), scene, app_logic, "Colors")
    slicer.mrmlScene = scene
    slicer.modules = SimpleNamespace(
        volumes=SimpleNamespace(logic=lambda: app.volumes),
        segmentations=SimpleNamespace(logic=lambda: app.segmentations),
        tables=SimpleNamespace(logic=lambda: app.tables),
        subjecthierarchy=SimpleNamespace(logic=lambda: app.subject_hierarchy),
    )
    return app


def _module_logic(logic, scene, app_logic, name: str):
    logic.SetMRMLApplicationLogic(app_logic)
    logic.SetMRMLScene(scene)
    app_logic.SetModuleLogic(name, logic)
    return logic


def add_volume(array_kji: np.ndarray, ijk_to_ras: np.ndarray, name: str = "CT",
               label_map: bool = False):
    """A scalar (or label map) volume node holding a copy of ``array_kji``."""
    node_class = "vtkMRMLLabelMapVolumeNode" if label_map else "vtkMRMLScalarVolumeNode"
    return slicer.util.addVolumeFromArray(np.ascontiguousarray(array_kji), ijk_to_ras, name,
                                          node_class)


class PendingCalls:
    """A scheduler that collects calls and runs each distinct one once on ``flush``,
    as the widget's debounced timer does after a burst of events."""

    def __init__(self):
        self.pending: list = []

    def __call__(self, call) -> None:
        if call not in self.pending:
            self.pending.append(call)

    def flush(self) -> int:
        calls, self.pending = self.pending, []
        for call in calls:
            call()
        return len(calls)
