"""3D Slicer module: skeletal muscle at L3 on one axial CT slice (see docs/SLICER.md).

The widget binds the panel (Resources/UI/L3MuscleSeg.ui) to a typed parameter node, runs
background jobs and shows their progress. Everything that computes lives in
L3MuscleSegMRML (MRML ↔ library, tested headless) and L3MuscleSegLib; the few methods of
L3MuscleSegLogic below are the Slicer-only glue (views, markups, Python packages).
"""

import enum
import importlib
import importlib.util
import json
import logging
import re
import sys
import tempfile
from pathlib import Path
from typing import Annotated

import qt
import slicer
import vtk
from slicer import (
    vtkMRMLMarkupsFiducialNode,
    vtkMRMLScalarVolumeNode,
    vtkMRMLSegmentationNode,
    vtkMRMLTableNode,
)
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper, unannotatedType
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

_MODULE_DIR = Path(__file__).resolve().parent


def _addLibraryToPath() -> None:
    """Make L3MuscleSegLib importable: installed beside this file, or one level up in a
    source checkout (the module folder alone is on sys.path there)."""
    for folder in (_MODULE_DIR, _MODULE_DIR.parent):
        if (folder / "L3MuscleSegLib").is_dir():
            if str(folder) not in sys.path:
                sys.path.insert(0, str(folder))
            return


_addLibraryToPath()

# Imported after the path is set; at import they need only what Slicer bundles.
from L3MuscleSegMRML import (  # noqa: E402
    SLICE_Z_ATTRIBUTE,
    L3MuscleSegMRMLLogic,
    MetricsFollower,
    python_interpreter,
)

from L3MuscleSegLib.errors import InputError, L3MuscleSegError, ModelError  # noqa: E402

SETTINGS_GROUP = "L3MuscleSeg"
SEGMENT_EDITOR_SINGLETON_TAG = "L3MuscleSeg.SegmentEditor"
REFINE_EFFECTS = ["Paint", "Erase", "Scissors", "Draw", "Smoothing", "Islands"]
METRICS_DELAY_MS = 300
JOB_POLL_MS = 200
# What export_case writes for a case (L3MuscleSegMRML.export_case and pipeline.write_case).
EXPORT_SUFFIXES = (".seg.nrrd", "-metrics.csv", "-report.json", "-image.nii.gz",
                   "-label.nii.gz", "-overlay.png")

# Real CT for trying the module: TotalSegmentator's test CT (Apache-2.0; Wasserthal et al.,
# Radiol Artif Intell 2023), pinned to a commit and checked by SHA-256.
SAMPLE_CT_URL = (
    "https://raw.githubusercontent.com/wasserth/TotalSegmentator/"
    "0e65a448d557382b1e925276212b3bec7f5aff83/tests/reference_files/example_ct.nii.gz"
)
SAMPLE_CT_SHA256 = "dbd3ae6d614d1d7ef3a46925c30c70038ed52da6b37fdd6afdc7b9b71387e3e1"

# Python packages the library needs beyond what Slicer bundles, installed on first use.
# torch comes from the PyTorch extension (PyTorchUtils picks the CUDA/CPU build).
# nnunetv2 and dynamic-network-architectures are installed without their dependencies:
# these would pull timm → torchvision and could replace the installed torch; the 2D U-Net
# never imports timm. Their other dependencies are listed explicitly (as requirements/ci.txt).
TORCH_REQUIREMENT = ">=2.1.2,!=2.9.*"
PIP_REQUIREMENTS = (  # (pip requirement, import name)
    ("psutil", "psutil"),
    ("pandas", "pandas"),
    ("matplotlib", "matplotlib"),
    ("nibabel>=5", "nibabel"),
    ("acvl-utils>=0.2.6,<0.3", "acvl_utils"),
    ("batchgenerators>=0.25.1", "batchgenerators"),
    ("batchgeneratorsv2>=0.3.2", "batchgeneratorsv2"),
    ("scikit-learn", "sklearn"),
    ("scikit-image>=0.19.3", "skimage"),
    ("tqdm", "tqdm"),
    ("tifffile", "tifffile"),
    ("imagecodecs", "imagecodecs"),
    ("graphviz", "graphviz"),
    ("seaborn", "seaborn"),
    ("yacs", "yacs"),
    ("einops", "einops"),
    ("blosc2>=3.3.2", "blosc2"),
)
NO_DEPS_REQUIREMENTS = (
    ("dynamic-network-architectures>=0.4.4,<0.5", "dynamic_network_architectures"),
    ("nnunetv2>=2.6,<2.9", "nnunetv2"),
)


def resourcePath(*parts: str) -> str:
    """A file of Resources/: next to this file when installed, one level up in a checkout."""
    for folder in (_MODULE_DIR / "Resources", _MODULE_DIR.parent / "Resources"):
        if folder.is_dir():
            return str(folder.joinpath(*parts))
    raise RuntimeError(f"L3MuscleSeg: no Resources folder next to or above {_MODULE_DIR}.")


#
# L3MuscleSeg
#


class L3MuscleSeg(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("L3 Muscle Segmentation")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = ["Segmentations", "Markups", "Tables"]
        self.parent.contributors = ["L3MuscleSeg contributors"]
        self.parent.helpText = _("""
Segments psoas (red), paraspinal (green) and abdominal-wall (blue) muscle on one axial CT
slice at the L3 vertebra with a 2D nnU-Net v2 ensemble, lets you refine the result, and
measures area, radiodensity, IMAT and the skeletal muscle index.
See the <a href="https://github.com/L3MuscleSeg/SlicerL3MuscleSeg/blob/main/docs/SLICER.md">
module documentation</a>. The bundled demo model is trained on synthetic phantoms and is not
for clinical use.
""")
        self.parent.acknowledgementText = _("""
The sample CT is TotalSegmentator's test CT (Apache-2.0): Wasserthal J. et al.,
TotalSegmentator: robust segmentation of 104 anatomic structures in CT images,
Radiology: Artificial Intelligence 2023. Segmentation uses nnU-Net v2 (Isensee F. et al.,
Nature Methods 2021).
""")
        self.parent.icon = qt.QIcon(resourcePath("Icons", "L3MuscleSeg.png"))
        slicer.app.connect("startupCompleted()", registerSampleData)


def registerSampleData():
    """Offer the real abdominal CT in the Sample Data module."""
    import SampleData

    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category="L3MuscleSeg",
        sampleName="L3MuscleSegAbdomenCT",
        thumbnailFileName=resourcePath("Icons", "L3MuscleSeg.png"),
        uris=SAMPLE_CT_URL,
        fileNames="TotalSegmentator-example_ct.nii.gz",
        checksums=f"SHA256:{SAMPLE_CT_SHA256}",
        nodeNames="AbdomenCT",
    )


#
# Parameter node
#


class FoldMode(enum.Enum):
    ENSEMBLE = "all"
    SINGLE = "single"

    def label(self) -> str:
        return _("Ensemble of all folds") if self is FoldMode.ENSEMBLE else _("Single fold")


class Device(enum.Enum):
    AUTO = "auto"
    CPU = "cpu"
    GPU = "gpu"

    def label(self) -> str:
        return {Device.AUTO: _("Automatic"), Device.CPU: _("CPU"), Device.GPU: _("GPU")}[self]

    def workerName(self) -> str:
        """The library's device name: a GPU is CUDA, or Metal (mps) on macOS."""
        if self is Device.GPU:
            return "mps" if sys.platform == "darwin" else "cuda"
        return self.value


@parameterNodeWrapper
class L3MuscleSegParameterNode:
    """Everything the panel shows, saved with the scene.

    sliceIndex - the axial slice to segment (index along the CT's S-I array axis), -1: none.
    localizerSliceIndex, localizerConfidence, localization - the last "Find L3" result
        (index -1: not run; localization: the localiser's JSON report section); a
        sliceIndex that differs from it is the user's override, recorded in the report.
    settingsApplied - the persistent user settings were copied in once.
    """

    inputVolume: vtkMRMLScalarVolumeNode
    sliceIndex: int = -1
    localizerSliceIndex: int = -1
    localizerConfidence: str = ""
    localization: str = ""
    levelMarkups: vtkMRMLMarkupsFiducialNode
    modelFolder: Path
    foldMode: FoldMode = FoldMode.ENSEMBLE
    fold: Annotated[int, WithinRange(0, 9)] = 0
    device: Device = Device.AUTO
    mirroring: bool = True
    segmentation: vtkMRMLSegmentationNode
    referenceSegmentation: vtkMRMLSegmentationNode
    heightM: Annotated[float, WithinRange(0.0, 2.5)] = 0.0
    metricsTable: vtkMRMLTableNode
    exportFolder: Path
    caseId: str = ""
    trainDataset: Path
    trainFolds: str = "all"
    trainEpochs: Annotated[int, WithinRange(1, 10000)] = 1000
    trainDevice: Device = Device.AUTO
    settingsApplied: bool = False


# Parameters remembered between sessions (QSettings key → parameter name).
PERSISTENT_PARAMETERS = {
    "ModelFolder": "modelFolder", "FoldMode": "foldMode", "Fold": "fold", "Device": "device",
    "Mirroring": "mirroring", "ExportFolder": "exportFolder", "TrainDataset": "trainDataset",
    "TrainFolds": "trainFolds", "TrainEpochs": "trainEpochs", "TrainDevice": "trainDevice",
}


def pathOrNone(path) -> Path | None:
    """The wrapper stores an empty path as "."; treat that as not set."""
    return None if path is None or str(path) in ("", ".") else Path(path)


#
# L3MuscleSegWidget
#


class L3MuscleSegWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._updatingGui = False
        self._shownVolume = None
        self._boundSegmentation = None
        self._validatedModelFolder = None
        self._metricsInputs = None
        self._savedSettings = {}
        self._follower = None
        self._pendingMetrics = None
        self._job = None  # the running background job: _RunningJob

    def resourcePath(self, filename: str) -> str:
        return resourcePath(filename)

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/L3MuscleSeg.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = L3MuscleSegLogic()

        self._setupSegmentEditor()
        self._setupMetricsView()
        self._metricsTimer = self._timer(METRICS_DELAY_MS, self._runPendingMetrics, single=True)
        self._jobTimer = self._timer(JOB_POLL_MS, self._pollJob, single=False)
        self.ui.logTextEdit.maximumBlockCount = 5000
        self.ui.trainLogTextEdit.maximumBlockCount = 5000

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.sliceSlider.connect("valueChanged(int)", self.onSliceChosen)
        self.ui.sliceSpinBox.connect("valueChanged(int)", self.onSliceChosen)
        self.ui.useCurrentSliceButton.connect("clicked()", self.onUseCurrentSlice)
        self.ui.findL3Button.connect("clicked()", self.onFindL3)
        self.ui.modelComboBox.connect("activated(int)", self.onModelChosen)
        self.ui.segmentButton.connect("clicked()", self.onSegment)
        self.ui.cancelButton.connect("clicked()", self.onCancel)
        self.ui.trainCancelButton.connect("clicked()", self.onCancel)
        self.ui.exportButton.connect("clicked()", self.onExport)
        self.ui.trainButton.connect("clicked()", self.onTrain)

        self._fillModelList()
        self.initializeParameterNode()

    @staticmethod
    def _timer(intervalMs: int, slot, single: bool):
        timer = qt.QTimer()
        timer.setSingleShot(single)
        timer.setInterval(intervalMs)
        timer.connect("timeout()", slot)
        return timer

    def _setupSegmentEditor(self) -> None:
        """An embedded Segment Editor with its own parameter node, bound to the result."""
        editor = slicer.qMRMLSegmentEditorWidget()
        editor.setMaximumNumberOfUndoStates(10)
        editor.setMRMLSegmentEditorNode(self._segmentEditorNode())
        editor.setMRMLScene(slicer.mrmlScene)
        editor.setSegmentationNodeSelectorVisible(False)  # the Result selector drives it
        editor.setSourceVolumeNodeSelectorVisible(False)  # the input CT
        editor.setEffectNameOrder(REFINE_EFFECTS)
        editor.unorderedEffectsVisible = False
        self.ui.refineCollapsibleButton.layout().addWidget(editor)
        self.segmentEditorWidget = editor

    @staticmethod
    def _segmentEditorNode():
        node = slicer.mrmlScene.GetSingletonNode(SEGMENT_EDITOR_SINGLETON_TAG,
                                                 "vtkMRMLSegmentEditorNode")
        if node is None:
            node = slicer.mrmlScene.CreateNodeByClass("vtkMRMLSegmentEditorNode")
            node.UnRegister(None)
            node.SetSingletonTag(SEGMENT_EDITOR_SINGLETON_TAG)
            node = slicer.mrmlScene.AddNode(node)
        return node

    def _setupMetricsView(self) -> None:
        view = slicer.qMRMLTableView()
        view.setMRMLScene(slicer.mrmlScene)
        view.setMinimumHeight(160)
        self.ui.metricsCollapsibleButton.layout().addRow(view)
        self.metricsTableView = view

    def cleanup(self) -> None:
        """Called when the application closes and the module widget is destroyed."""
        if self._job is not None:
            self._job.job.cancel()
        self._stopFollowing()
        self._metricsTimer.stop()
        self._jobTimer.stop()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()
        self.segmentEditorWidget.setMRMLSegmentEditorNode(self._segmentEditorNode())
        self.segmentEditorWidget.installKeyboardShortcuts()
        self.segmentEditorWidget.updateWidgetFromMRML()

    def exit(self) -> None:
        self.segmentEditorWidget.setActiveEffect(None)
        self.segmentEditorWidget.uninstallKeyboardShortcuts()
        self.segmentEditorWidget.removeViewObservations()
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent,
                                self.onParameterNodeModified)

    def onSceneStartClose(self, caller, event) -> None:
        if self._job is not None and self._job.kind == "segment":
            self._job.job.cancel()  # its input and output nodes are going away
        self.segmentEditorWidget.setSegmentationNode(None)
        self.segmentEditorWidget.removeViewObservations()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()
            self.segmentEditorWidget.setMRMLSegmentEditorNode(self._segmentEditorNode())

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        node = self._parameterNode
        if not node.settingsApplied:
            self._applySettings(node)
        if not node.inputVolume:
            firstVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolume and not firstVolume.IsA("vtkMRMLLabelMapVolumeNode"):
                node.inputVolume = firstVolume

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            if self.hasObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent,
                                self.onParameterNodeModified):
                self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent,
                                    self.onParameterNodeModified)
        if inputParameterNode is not self._parameterNode:
            self._forgetFollowedState()
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            # Widgets with the "SlicerParameterName" property in the .ui are bound here.
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent,
                             self.onParameterNodeModified)
            self.onParameterNodeModified()
        else:
            self._updateButtons()

    def _forgetFollowedState(self) -> None:
        self._stopFollowing()
        self._shownVolume = None
        self._boundSegmentation = None
        self._metricsInputs = None
        self._validatedModelFolder = None

    # ------------------------------------------------------------ settings

    def _applySettings(self, node) -> None:
        """Copy the user's remembered choices into a new parameter node."""
        with slicer.util.NodeModify(node):
            for key, name in PERSISTENT_PARAMETERS.items():
                text = slicer.util.settingsValue(f"{SETTINGS_GROUP}/{key}", None)
                if text is None:
                    continue
                try:
                    node.setValue(name, self._fromSetting(node.dataType(name), text))
                except (ValueError, TypeError, KeyError) as err:
                    logging.warning("Ignoring the saved L3MuscleSeg setting %s=%r: %s",
                                    key, text, err)
            if pathOrNone(node.modelFolder) is None:
                demo = self.logic.bundledDemoModel()
                if demo is not None:
                    node.modelFolder = demo
            if pathOrNone(node.exportFolder) is None:
                node.exportFolder = Path.home() / "L3MuscleSeg"
            node.settingsApplied = True

    @staticmethod
    def _fromSetting(dataType, text: str):
        base = unannotatedType(dataType)
        if isinstance(base, type) and issubclass(base, enum.Enum):
            return base[text]
        if base is bool:
            return slicer.util.toBool(text)
        return base(text)

    def _saveSettings(self, node) -> None:
        values = {}
        for key, name in PERSISTENT_PARAMETERS.items():
            value = node.getValue(name)
            values[key] = value.name if isinstance(value, enum.Enum) else str(value)
        if values != self._savedSettings:
            settings = qt.QSettings()
            for key, text in values.items():
                settings.setValue(f"{SETTINGS_GROUP}/{key}", text)
            self._savedSettings = values

    # ------------------------------------------------------------ parameter node → GUI

    def onParameterNodeModified(self, caller=None, event=None) -> None:
        node = self._parameterNode
        if node is None or self._updatingGui:
            return
        self._updatingGui = True
        try:
            self._followInputVolume(node)
            self._followSegmentation(node)
            self._followModelFolder(node)
            self._showSlice(node)
            self._showLocalizer(node)
            self._scheduleMetricsOnInputChange(node)
            self._saveSettings(node)
        finally:
            self._updatingGui = False
        self._updateButtons()

    def _followInputVolume(self, node) -> None:
        volume = node.inputVolume
        if volume is self._shownVolume:
            return
        switched = self._shownVolume is not None
        self._shownVolume = volume
        self._observeRedSlice(volume is not None)
        if volume is None:
            return
        count = self.logic.axial_slice_count(volume)
        for widget in (self.ui.sliceSlider, self.ui.sliceSpinBox):
            blocked = widget.blockSignals(True)
            widget.setRange(0, count - 1)
            widget.blockSignals(blocked)
        if switched or not 0 <= node.sliceIndex < count:
            node.sliceIndex = self.logic.sliceIndexInViewOrMiddle(volume)
        if switched:
            node.localizerSliceIndex = -1
            node.localization = ""
            node.caseId = ""
        if not node.caseId:
            node.caseId = caseIdFromName(volume.GetName())
        height = self.logic.patient_height_m(volume)
        if height is not None:
            node.heightM = height
        slicer.util.setSliceViewerLayers(background=volume, fit=True)
        self.logic.showSlice(volume, node.sliceIndex)
        self._bindSegmentEditor(node)

    def _followSegmentation(self, node) -> None:
        segmentation = node.segmentation
        if segmentation is self._boundSegmentation:
            return
        self._boundSegmentation = segmentation
        self._stopFollowing()
        self._bindSegmentEditor(node)
        if segmentation is not None:
            self._follower = MetricsFollower(segmentation, self._recomputeMetrics,
                                             schedule=self._scheduleMetrics,
                                             on_error=self._showMetricsProblem)
            self._refreshMetrics()
        self._showQuality()

    def _bindSegmentEditor(self, node) -> None:
        """Edit the result on the input CT (the source volume needs a segmentation first)."""
        self.segmentEditorWidget.setSegmentationNode(node.segmentation)
        if node.segmentation is not None:
            self.segmentEditorWidget.setSourceVolumeNode(node.inputVolume)

    def _stopFollowing(self) -> None:
        if self._follower is not None:
            self._follower.stop()
            self._follower = None

    def _followModelFolder(self, node) -> None:
        folder = pathOrNone(node.modelFolder)
        if folder == self._validatedModelFolder:
            return
        self._validatedModelFolder = folder
        self._selectModelInList(folder)
        self.ui.modelStatusLabel.text = self.logic.describeModelFolder(folder)

    def _showSlice(self, node) -> None:
        volume = node.inputVolume
        for widget in (self.ui.sliceSlider, self.ui.sliceSpinBox):
            blocked = widget.blockSignals(True)
            widget.value = max(node.sliceIndex, 0)
            widget.blockSignals(blocked)
        if volume is None or node.sliceIndex < 0:
            self.ui.sliceInfoLabel.text = _("no input selected")
            return
        z = self.logic.slice_index_to_z_ras(volume, node.sliceIndex)
        self.ui.sliceInfoLabel.text = _("z = {z:.1f} mm, slice {index} of 0–{last}").format(
            z=z, index=node.sliceIndex, last=self.logic.axial_slice_count(volume) - 1)

    def _showLocalizer(self, node) -> None:
        label = self.ui.localizerLabel
        if node.localizerSliceIndex < 0:
            label.text, label.toolTip = _("not run"), ""
            return
        text = _("L3 at slice {index}, confidence {confidence}").format(
            index=node.localizerSliceIndex, confidence=node.localizerConfidence)
        if node.localizerConfidence == "low":
            text = "<b>" + text + " - " + _("review recommended") + "</b>"
        if node.sliceIndex != node.localizerSliceIndex:
            text += "; " + _("overridden: slice {index} is used").format(index=node.sliceIndex)
        label.text = text
        label.toolTip = json.loads(node.localization).get("reason", "") if node.localization \
            else ""

    def _updateButtons(self) -> None:
        node = self._parameterNode
        busy = self._job is not None
        hasInput = bool(node and node.inputVolume)
        hasModel = bool(node and pathOrNone(node.modelFolder))
        self.ui.segmentButton.enabled = hasInput and hasModel and not busy and node.sliceIndex >= 0
        self.ui.segmentButton.toolTip = (
            _("Segment the selected slice in the background.") if self.ui.segmentButton.enabled
            else _("Select an input CT, a slice and a model folder first."))
        self.ui.findL3Button.enabled = hasInput and not busy
        self.ui.useCurrentSliceButton.enabled = hasInput
        self.ui.exportButton.enabled = bool(hasInput and node.segmentation) and not busy
        self.ui.trainButton.enabled = bool(node and pathOrNone(node.trainDataset)) and not busy
        self.ui.cancelButton.enabled = busy and self._job.kind == "segment"
        self.ui.trainCancelButton.enabled = busy and self._job.kind == "train"
        self.ui.foldSpinBox.enabled = bool(node) and node.foldMode is FoldMode.SINGLE

    # ------------------------------------------------------------ slice selection

    def onSliceChosen(self, index: int) -> None:
        node = self._parameterNode
        if node is None or node.inputVolume is None or index == node.sliceIndex:
            return
        with slicer.util.tryWithErrorDisplay(_("Could not show the slice.")):
            node.sliceIndex = index
            self.logic.showSlice(node.inputVolume, index)

    def onUseCurrentSlice(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Could not take the slice of the Red view.")):
            node = self._parameterNode
            node.sliceIndex = self.logic.sliceIndexInView(node.inputVolume)

    def _observeRedSlice(self, observe: bool) -> None:
        red = self.logic.redSliceNode()
        if red is None:
            return
        watching = self.hasObserver(red, vtk.vtkCommand.ModifiedEvent, self.onRedSliceModified)
        if observe and not watching:
            self.addObserver(red, vtk.vtkCommand.ModifiedEvent, self.onRedSliceModified)
        elif not observe and watching:
            self.removeObserver(red, vtk.vtkCommand.ModifiedEvent, self.onRedSliceModified)

    def onRedSliceModified(self, caller, event) -> None:
        """Scrolling the Red view moves the slider (when the view is axial)."""
        node = self._parameterNode
        if node is None or node.inputVolume is None or not self.logic.redViewIsAxial():
            return
        index = self.logic.sliceIndexInView(node.inputVolume)
        if index != node.sliceIndex:
            node.sliceIndex = index

    def onFindL3(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Could not locate L3.")):
            if not self._ensureDependencies():
                return
            node = self._parameterNode
            volume = node.inputVolume
            with slicer.util.WaitCursor():
                localization = self.logic.findL3(volume)
            index = self.logic.localizedSliceIndex(volume, localization)
            with slicer.util.NodeModify(node):
                node.localizerSliceIndex = index
                node.localizerConfidence = localization.confidence
                node.localization = json.dumps(localization.to_dict())
                node.sliceIndex = index
                node.levelMarkups = self.logic.showLevels(volume, localization,
                                                          node.levelMarkups)
            self.logic.showSlice(volume, index)

    # ------------------------------------------------------------ model

    def _fillModelList(self) -> None:
        combo = self.ui.modelComboBox
        combo.clear()
        for label, folder in self.logic.modelChoices():
            combo.addItem(label, str(folder))
        combo.addItem(_("Choose folder…"), "")

    def _selectModelInList(self, folder: Path | None) -> None:
        combo = self.ui.modelComboBox
        index = combo.findData(str(folder)) if folder is not None else -1
        blocked = combo.blockSignals(True)
        combo.currentIndex = index if index >= 0 else combo.count - 1
        combo.blockSignals(blocked)

    def onModelChosen(self, index: int) -> None:
        with slicer.util.tryWithErrorDisplay(_("Could not use that model.")):
            node = self._parameterNode
            folder = self.ui.modelComboBox.itemData(index)
            if not folder:
                start = str(pathOrNone(node.modelFolder) or Path.home())
                folder = qt.QFileDialog.getExistingDirectory(
                    slicer.util.mainWindow(), _("Choose an nnU-Net model folder"), start)
                if not folder:
                    self._selectModelInList(pathOrNone(node.modelFolder))
                    return
            node.modelFolder = Path(folder)

    # ------------------------------------------------------------ dependencies

    def _ensureDependencies(self) -> bool:
        """Install missing Python packages after asking; False when the user declines."""
        missing = self.logic.missingPackages()
        if not missing:
            return True
        if not slicer.util.confirmOkCancelDisplay(
                _("L3MuscleSeg needs Python packages that are not installed yet. Install them "
                  "now? This needs a network connection and may take several minutes."),
                _("Install Python packages"),
                detailedText=_("To install: {packages}").format(packages=", ".join(missing))):
            return False
        with slicer.util.WaitCursor():
            self.logic.installPackages()
        self._fillModelList()
        self._validatedModelFolder = None
        self.onParameterNodeModified()
        return True

    # ------------------------------------------------------------ segmentation job

    def onSegment(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Segmentation could not start.")):
            if self._job is not None or not self._ensureDependencies():
                return
            node = self._parameterNode
            overwrite = False
            if node.segmentation is not None and self.logic.has_manual_edits(node.segmentation):
                if not slicer.util.confirmOkCancelDisplay(
                        _("Segmentation '{name}' has manual edits. Replace them with a new "
                          "result?").format(name=node.segmentation.GetName()),
                        _("Replace manual edits")):
                    return
                overwrite = True
            with slicer.util.WaitCursor():
                axialSlice = self.logic.pick_slice(node.inputVolume, node.sliceIndex)
                job = self.logic.startSegmentation(axialSlice, node)
            self._startJob(_RunningJob("segment", job, node.inputVolume, axialSlice, overwrite),
                           self.ui.logTextEdit, self.ui.progressBar)

    def onTrain(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Training could not start.")):
            if self._job is not None or not self._ensureDependencies():
                return
            job = self.logic.startTraining(self._parameterNode)
            self._startJob(_RunningJob("train", job), self.ui.trainLogTextEdit,
                           self.ui.trainProgressBar)

    def _startJob(self, running, logBox, progressBar) -> None:
        self._job = running
        running.logBox, running.progressBar = logBox, progressBar
        logBox.clear()
        progressBar.setRange(0, 0)  # busy until the first progress line
        progressBar.setFormat(_("starting…"))
        self._jobTimer.start()
        self._updateButtons()

    def onCancel(self) -> None:
        if self._job is not None:
            self._job.logBox.appendPlainText(_("Cancelling…"))
            self._job.job.cancel()

    def _pollJob(self) -> None:
        running = self._job
        if running is None:
            self._jobTimer.stop()
            return
        for event in running.job.poll():
            if event.kind == "progress" and event.total > 0:
                running.progressBar.setRange(0, event.total)
                running.progressBar.value = event.done
                running.progressBar.setFormat(f"%p% {event.text}")
            else:
                running.logBox.appendPlainText(event.text)
        if running.job.is_done:
            self._jobTimer.stop()
            self._job = None
            self._updateButtons()
            self._finishJob(running)

    def _finishJob(self, running) -> None:
        job, progressBar = running.job, running.progressBar
        progressBar.setRange(0, 1)
        progressBar.value = 0
        if job.cancelled:
            progressBar.setFormat(_("cancelled"))
            running.logBox.appendPlainText(_("Cancelled: nothing was changed."))
            return
        if job.error is not None:
            progressBar.setFormat(_("failed"))
            running.logBox.appendPlainText(str(job.error))
            failed = _("Segmentation failed.") if running.kind == "segment" else _(
                "Training failed.")
            slicer.util.errorDisplay(f"{failed}\n\n{job.error}",
                                     detailedText=running.logBox.toPlainText())
            return
        progressBar.value = 1
        progressBar.setFormat(_("done"))
        if running.kind == "segment":
            with slicer.util.tryWithErrorDisplay(_("The result could not be shown.")):
                self._showSegmentationResult(running)
        else:
            self._fillModelList()

    def _showSegmentationResult(self, running) -> None:
        node = self._parameterNode
        if node is None or not slicer.mrmlScene.IsNodePresent(running.volume):
            raise RuntimeError(_("The input CT was removed while segmenting."))
        segmentation = self.logic.apply_result(
            running.volume, running.axialSlice, running.job.result.labels, node.segmentation,
            overwrite_edits=running.overwriteEdits, result=running.job.result.summary)
        node.segmentation = segmentation
        self._refreshMetrics()
        self._showQuality()

    # ------------------------------------------------------------ metrics

    def _scheduleMetrics(self, call) -> None:
        """Debounce: one recompute ~300 ms after the last edit of a brush stroke."""
        self._pendingMetrics = call
        self._metricsTimer.start()

    def _runPendingMetrics(self) -> None:
        call, self._pendingMetrics = self._pendingMetrics, None
        if call is not None:
            call()

    def _scheduleMetricsOnInputChange(self, node) -> None:
        inputs = (node.inputVolume, node.segmentation, node.referenceSegmentation, node.heightM)
        if inputs != self._metricsInputs:
            self._metricsInputs = inputs
            if node.segmentation is not None:
                self._refreshMetrics()

    def _refreshMetrics(self) -> None:
        if self._follower is not None:
            self._follower.refresh()

    def _recomputeMetrics(self) -> None:
        node = self._parameterNode
        if node is None or node.segmentation is None or node.inputVolume is None:
            return
        with slicer.util.NodeModify(node):
            table = self.logic.recomputeMetrics(node)
            node.metricsTable = table
        self.metricsTableView.setMRMLTableNode(table)
        self._showQuality()

    def _showMetricsProblem(self, error) -> None:
        self.ui.qcLabel.text = _("Metrics not updated: {error}").format(error=error)

    def _showQuality(self) -> None:
        node = self._parameterNode
        segmentation = node.segmentation if node else None
        if segmentation is None:
            self.ui.qcLabel.text = ""
            return
        result = self.logic.stored_result(segmentation)
        if result is None:
            self.ui.qcLabel.text = _("no model result on this segmentation")
            return
        text = self.logic.qc_message(result)
        review = (result.get("qc") or {}).get("review_recommended")
        self.ui.qcLabel.text = f"<b>{text}</b>" if review else text

    # ------------------------------------------------------------ export

    def onExport(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Export failed.")):
            if not self._ensureDependencies():
                return
            node = self._parameterNode
            cohortCsv = pathOrNone(self.ui.cohortCsvPathLineEdit.currentPath)
            existing = self.logic.existingExportFiles(node)
            if existing and not slicer.util.confirmOkCancelDisplay(
                    _("Replace the existing files of case '{case}'?").format(case=node.caseId),
                    _("Replace exported files"), detailedText="\n".join(existing)):
                return
            with slicer.util.WaitCursor():
                exported = self.logic.exportCase(node, cohortCsv, overwrite=bool(existing))
            self.ui.cohortCsvPathLineEdit.addCurrentPathToHistory()  # remembered (settingKey)
            slicer.util.showStatusMessage(
                _("Exported case {case} to {folder}").format(
                    case=node.caseId, folder=exported.case.report_path.parent), 5000)


class _RunningJob:
    """A background job and what the widget needs when it ends."""

    def __init__(self, kind, job, volume=None, axialSlice=None, overwriteEdits=False):
        self.kind = kind  # "segment" or "train"
        self.job = job
        self.volume = volume
        self.axialSlice = axialSlice
        self.overwriteEdits = overwriteEdits
        self.logBox = None
        self.progressBar = None


def rasFromLps(point) -> tuple:
    return (-point[0], -point[1], point[2])


def caseIdFromName(name: str) -> str:
    """A file-name-safe case ID from a node name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "case"


#
# L3MuscleSegLogic
#


class L3MuscleSegLogic(ScriptedLoadableModuleLogic, L3MuscleSegMRMLLogic):
    """Slicer's module logic: the headless L3MuscleSegMRMLLogic plus Slicer-only glue
    (slice views, markups, Python packages). No dialogs: errors are exceptions."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._metricsSlice = None  # (key, AxialSlice): the slice of the followed result

    def getParameterNode(self):
        return L3MuscleSegParameterNode(super().getParameterNode())

    # ------------------------------------------------------------ views

    @staticmethod
    def redSliceNode():
        return slicer.mrmlScene.GetNodeByID("vtkMRMLSliceNodeRed")

    def redViewIsAxial(self) -> bool:
        red = self.redSliceNode()
        return red is not None and red.GetOrientation() == "Axial"

    def showSlice(self, volumeNode, index: int) -> None:
        """Move the Red view to the slice (its plane through the slice centre)."""
        red = self.redSliceNode()
        if red is None or volumeNode is None:
            return
        bounds = [0.0] * 6
        volumeNode.GetRASBounds(bounds)
        red.JumpSliceByOffsetting((bounds[0] + bounds[1]) / 2, (bounds[2] + bounds[3]) / 2,
                                  self.slice_index_to_z_ras(volumeNode, index))

    def sliceIndexInView(self, volumeNode) -> int:
        """The input slice nearest to the Red view's plane."""
        if not self.redViewIsAxial():
            raise InputError(_("The Red view is not axial: set its orientation to Axial."))
        return self.z_ras_to_slice_index(volumeNode, self.redSliceNode().GetSliceOffset())

    def sliceIndexInViewOrMiddle(self, volumeNode) -> int:
        if self.redViewIsAxial():
            return self.sliceIndexInView(volumeNode)
        return self.axial_slice_count(volumeNode) // 2

    # ------------------------------------------------------------ L3 localiser

    def findL3(self, volumeNode):
        """The automatic L3 localiser (vertebra counting) on the input CT."""
        from L3MuscleSegLib.localize import localize_l3

        localization = localize_l3(self.volume_from_node(volumeNode))
        if not localization.found:
            raise InputError(_("L3 was not found: {reason} Choose the slice by hand.").format(
                reason=localization.reason))
        return localization

    def localizedSliceIndex(self, volumeNode, localization) -> int:
        """The localiser's L3 slice (by z for an oblique volume, which has no index)."""
        if localization.l3_index is not None:
            return localization.l3_index
        return self.z_ras_to_slice_index(volumeNode, localization.l3_z_mm)

    @staticmethod
    def showLevels(volumeNode, localization, markupsNode=None):
        """A label per vertebra found (T12, L1…L5, S1) at its mid-point on the column, and
        the Yellow (sagittal) view through L3. Reuses ``markupsNode`` when given."""
        if markupsNode is None or not slicer.mrmlScene.IsNodePresent(markupsNode):
            markupsNode = slicer.mrmlScene.AddNewNodeByClass(
                "vtkMRMLMarkupsFiducialNode", _("Vertebral levels"))
            markupsNode.CreateDefaultDisplayNodes()
            L3MuscleSegMRMLLogic.place_beside(markupsNode, volumeNode)
        markupsNode.SetAndObserveTransformNodeID(volumeNode.GetTransformNodeID())
        with slicer.util.NodeModify(markupsNode):
            markupsNode.RemoveAllControlPoints()
            for level in localization.levels:
                markupsNode.AddControlPoint(vtk.vtkVector3d(*rasFromLps(level.mid_point_lps)),
                                            level.name)
            markupsNode.SetLocked(True)
        markupsNode.GetDisplayNode().SetSliceProjection(True)  # labels near the plane show too
        l3 = localization.level("L3")
        yellow = slicer.mrmlScene.GetNodeByID("vtkMRMLSliceNodeYellow")
        if l3 is not None and yellow is not None:
            yellow.JumpSliceByOffsetting(*rasFromLps(l3.mid_point_lps))
        return markupsNode

    @staticmethod
    def localizationRecord(node, axialSlice) -> dict | None:
        """The report's "localization" section: the localiser's own record, plus the
        slice the user chose instead (as localize.with_override records it); None when the
        slice was picked by hand without running the localiser."""
        if not node.localization:
            return None
        record = json.loads(node.localization)
        if axialSlice.index != node.localizerSliceIndex:
            z = axialSlice.z_mm
            l3z = record.get("l3_z_mm")
            level = next((lv["name"] for lv in record.get("levels", [])
                          if lv["z_min_mm"] <= z <= lv["z_max_mm"]), "")
            record["override"] = {"index": axialSlice.index, "z_mm": round(z, 1),
                                  "offset_mm": None if l3z is None else round(z - l3z, 1),
                                  "level": level}
        return record

    # ------------------------------------------------------------ models

    @staticmethod
    def bundledDemoModel() -> Path | None:
        """L3MuscleSegLib/data/demo_model (models.DEMO_MODEL_DIR), found without importing
        models.py, which needs packages that may not be installed yet."""
        import L3MuscleSegLib

        folder = Path(L3MuscleSegLib.__file__).parent / "data" / "demo_model"
        return folder if folder.is_dir() else None

    def modelChoices(self) -> list:
        """(label, folder) of the installed models and the bundled demo model."""
        choices = []
        demo = self.bundledDemoModel()
        if demo is not None:
            choices.append((_("demo (bundled; not for clinical use)"), demo))
        try:
            from L3MuscleSegLib import models

            installed = models.list_models()
        except (ImportError, OSError) as err:  # packages not installed (or not loadable) yet
            logging.info("Installed models not listed yet: %s", err)
            return choices
        for model in installed:
            label = f"{model.ref} ({model.label})" if model.label else model.ref
            choices.append((label, model.path))
        return choices

    @staticmethod
    def describeModelFolder(folder: Path | None) -> str:
        """One line: what the folder holds, or exactly what is missing."""
        if folder is None:
            return _("Choose a model folder.")
        try:
            from L3MuscleSegLib.inference import validate_model_folder
        except (ImportError, OSError) as err:
            return _("Cannot check the model yet ({error}); the Python packages are "
                     "installed on the first Segment.").format(error=err)
        try:
            return "✔ " + validate_model_folder(folder).summary
        except (L3MuscleSegError, OSError, RuntimeError, ValueError) as err:
            return "✖ " + str(err)

    # ------------------------------------------------------------ jobs

    def startSegmentation(self, axialSlice, node):
        """Start inference on the slice in a background PythonSlicer child."""
        from L3MuscleSegLib.inference import validate_model_folder

        folder = pathOrNone(node.modelFolder)
        if folder is None:
            raise ModelError(_("Choose a model folder."))
        ensemble = node.foldMode is FoldMode.ENSEMBLE
        validate_model_folder(folder, folds="all" if ensemble else [node.fold])
        folds = "all" if ensemble else str(node.fold)
        job = self.segmentation_job(axialSlice, folder, folds=folds,
                                    device=node.device.workerName(), tta=node.mirroring)
        job.start()
        return job

    def trainingCommand(self, node) -> list:
        dataset = pathOrNone(node.trainDataset)
        if dataset is None:
            raise InputError(_("Choose the training dataset folder."))
        argv = [python_interpreter(), "-m", "L3MuscleSegLib.cli", "train", str(dataset),
                "--epochs", str(node.trainEpochs), "--device", node.trainDevice.workerName()]
        folds = node.trainFolds.replace(",", " ").split()
        if folds in ([], ["all"]):
            return argv  # the command's default: folds 0-4
        if not all(fold.isdigit() for fold in folds):
            raise InputError(_("Folds '{folds}': write 'all' or fold numbers such as 0 1 2 3 4."
                               ).format(folds=node.trainFolds))
        return [*argv, "--folds", *folds]

    def startTraining(self, node):
        """Start `l3muscleseg train` in a background child with a live log."""
        import L3MuscleSegMRML

        job = L3MuscleSegMRML.CommandJob(self.trainingCommand(node),
                                         env=L3MuscleSegMRML.worker_environment())
        job.start()
        return job

    def segmentNow(self, volumeNode, index: int, model, *, folds="all", device="cpu",
                   tta=False, segmentationNode=None, timeoutS: float = 900):
        """Segment synchronously (scripts and the self-test): job, wait, apply."""
        axialSlice = self.pick_slice(volumeNode, index)
        job = self.segmentation_job(axialSlice, model, folds=folds, device=device, tta=tta)
        job.start()
        if not job.wait(timeoutS):
            job.cancel()
            job.wait(30)
            raise TimeoutError(f"Segmentation did not finish within {timeoutS} s.")
        if job.error is not None:
            raise job.error
        segmentation = self.apply_result(volumeNode, axialSlice, job.result.labels,
                                         segmentationNode, result=job.result.summary)
        return segmentation, axialSlice

    # ------------------------------------------------------------ metrics and export

    def resultSlice(self, volumeNode, segmentationNode, fallbackIndex: int):
        """The slice the segmentation was made on (cached: it copies the CT), or the
        chosen slice for a segmentation made elsewhere."""
        z = segmentationNode.GetAttribute(SLICE_Z_ATTRIBUTE)
        key = (volumeNode.GetID(), volumeNode.GetImageData().GetMTime(), z,
               None if z else fallbackIndex)
        if self._metricsSlice is None or self._metricsSlice[0] != key:
            axialSlice = (self.slice_of_segmentation(segmentationNode, volumeNode) if z
                          else self.pick_slice(volumeNode, fallbackIndex))
            self._metricsSlice = (key, axialSlice)
        return self._metricsSlice[1]

    def recomputeMetrics(self, node):
        """Refill (or create) the metrics table from the current segmentation."""
        table = node.metricsTable
        if table is None or not slicer.mrmlScene.IsNodePresent(table):
            table = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLTableNode", _("L3 muscle metrics"))
            self.place_beside(table, node.inputVolume)
        axialSlice = self.resultSlice(node.inputVolume, node.segmentation, node.sliceIndex)
        self.recompute_metrics(node.inputVolume, node.segmentation, axialSlice, table,
                               reference_node=node.referenceSegmentation,
                               height_m=node.heightM or None)
        return table

    @staticmethod
    def existingExportFiles(node) -> list:
        """The files an export of this case would replace."""
        folder = pathOrNone(node.exportFolder)
        if folder is None:
            return []
        names = [f"{node.caseId}{suffix}" for suffix in EXPORT_SUFFIXES]
        return [str(folder / name) for name in names if (folder / name).exists()]

    def exportCase(self, node, cohortCsv: Path | None, overwrite: bool = False):
        folder = pathOrNone(node.exportFolder)
        if folder is None:
            raise InputError(_("Choose an output folder."))
        axialSlice = self.resultSlice(node.inputVolume, node.segmentation, node.sliceIndex)
        return self.export_case(
            folder, node.caseId, node.inputVolume, node.segmentation, axialSlice,
            reference_node=node.referenceSegmentation, height_m=node.heightM or None,
            cohort_csv=cohortCsv, overwrite=overwrite,
            localization=self.localizationRecord(node, axialSlice))

    # ------------------------------------------------------------ Python packages

    @staticmethod
    def missingPackages() -> list:
        """Display names of the packages still to install (empty: all present)."""
        missing = [] if importlib.util.find_spec("torch") else ["torch (PyTorch extension)"]
        missing += [requirement for requirement, module in PIP_REQUIREMENTS + NO_DEPS_REQUIREMENTS
                    if importlib.util.find_spec(module) is None]
        return missing

    @staticmethod
    def installPackages() -> None:
        """Install what :meth:`missingPackages` lists: torch through the PyTorch extension,
        the rest with pip (nnunetv2 and its network package without dependencies)."""
        if importlib.util.find_spec("torch") is None:
            try:
                import PyTorchUtils
            except ModuleNotFoundError:
                raise L3MuscleSegError(_(
                    "L3MuscleSeg needs the PyTorch extension: install it from the Extensions "
                    "Manager, restart Slicer and try again.")) from None
            torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(
                askConfirmation=False, torchVersionRequirement=TORCH_REQUIREMENT)
            if torch is None:
                raise L3MuscleSegError(_("PyTorch was not installed; use the PyTorch Utils "
                                         "module to install it, then try again."))
        for requirement, module in PIP_REQUIREMENTS:
            if importlib.util.find_spec(module) is None:
                slicer.util.pip_install([requirement])
        for requirement, module in NO_DEPS_REQUIREMENTS:
            if importlib.util.find_spec(module) is None:
                slicer.util.pip_install(["--no-deps", requirement])
        importlib.invalidate_caches()


#
# L3MuscleSegTest
#


class L3MuscleSegTest(ScriptedLoadableModuleTest):
    """The whole flow inside Slicer on the bundled demo model: phantom CT → slice →
    segment → three segments → an edit the metrics follow → export → read back."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_L3MuscleSeg_EndToEnd()

    def test_L3MuscleSeg_EndToEnd(self):
        import numpy as np
        import SimpleITK as sitk

        logic = L3MuscleSegLogic()
        if logic.missingPackages():
            self.delayDisplay("Installing Python packages")
            logic.installPackages()
        from L3MuscleSegLib.models import DEMO_MODEL_DIR
        from L3MuscleSegLib.phantom import make_phantom_volume

        self.delayDisplay("Phantom CT")
        volume, truth = make_phantom_volume(seed=7, n_slices=5, size=256)
        ijkToRas = volume.geometry.ijk_to_ras()
        ctNode = slicer.util.addVolumeFromArray(volume.array, ijkToRas, "L3Phantom")
        truthNode = slicer.util.addVolumeFromArray(truth.astype(np.uint8), ijkToRas,
                                                   "L3PhantomTruth", "vtkMRMLLabelMapVolumeNode")
        self.assertEqual(logic.axial_slice_count(ctNode), 5)
        index = 2  # the phantom's middle slice is its L3 slice
        if logic.redSliceNode() is not None:
            logic.showSlice(ctNode, index)
            self.assertEqual(logic.sliceIndexInView(ctNode), index)

        self.delayDisplay("Segment with the demo model")
        segmentation, axialSlice = logic.segmentNow(ctNode, index, DEMO_MODEL_DIR)
        names = [segmentation.GetSegmentation().GetNthSegment(i).GetName()
                 for i in range(segmentation.GetSegmentation().GetNumberOfSegments())]
        self.assertEqual(names, ["Psoas", "Paraspinal", "Abdominal wall"])
        self.assertFalse(logic.has_manual_edits(segmentation))

        table = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLTableNode", "metrics")
        metrics = logic.recompute_metrics(ctNode, segmentation, axialSlice, table,
                                          reference_node=truthNode, height_m=1.75)
        for muscle in metrics.classes:
            self.assertGreater(muscle.area_cm2, 2.0, muscle.name)
            self.assertLess(muscle.area_cm2, 150.0, muscle.name)
        self.assertGreater(metrics.mean_dice, 0.6)
        areaColumn = table.GetColumnIndex("Area (cm²)")
        self.assertAlmostEqual(float(table.GetCellText(0, areaColumn)),
                               metrics.classes[0].area_cm2, places=2)

        self.delayDisplay("Erase the psoas: the table follows")
        follower = MetricsFollower(segmentation, lambda: logic.recompute_metrics(
            ctNode, segmentation, axialSlice, table, reference_node=truthNode))
        try:
            psoas = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, "psoas", ctNode)
            slicer.util.updateSegmentBinaryLabelmapFromArray(
                np.zeros_like(psoas), segmentation, "psoas", ctNode)
        finally:
            follower.stop()
        self.assertEqual(float(table.GetCellText(0, areaColumn)), 0.0)
        self.assertTrue(logic.has_manual_edits(segmentation))

        self.delayDisplay("Export and read back")
        outDir = Path(tempfile.mkdtemp(prefix="L3MuscleSegTest-"))
        exported = logic.export_case(outDir, "phantom7", ctNode, segmentation, axialSlice,
                                     height_m=1.75, cohort_csv=outDir / "cohort.csv")
        labels = logic.labels_from_segmentation(segmentation, ctNode, axialSlice)
        written = sitk.GetArrayFromImage(sitk.ReadImage(str(exported.case.label_path)))
        self.assertEqual(int((written == 1).sum()), 0)
        self.assertEqual(int((written > 0).sum()), int((labels > 0).sum()))
        report = json.loads(exported.case.report_path.read_text(encoding="utf-8"))
        self.assertEqual(report["status"], "ok")
        self.assertTrue(report["inference"]["edited_after_inference"])
        reloaded = slicer.util.loadSegmentation(str(exported.segmentation_path))
        self.assertEqual(reloaded.GetSegmentation().GetNumberOfSegments(), 3)
        self.assertEqual(len((outDir / "cohort.csv").read_text().splitlines()), 2)
        self.delayDisplay("Test passed")
