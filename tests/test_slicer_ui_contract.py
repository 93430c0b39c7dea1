"""The module's Python and its .ui agree, checked without Qt or Slicer (XML and AST only).

* every ``self.ui.<name>`` the widget uses is an object of the .ui;
* every ``SlicerParameterName`` of the .ui is a field of the ``@parameterNodeWrapper`` class,
  and that field's type is one Slicer's GUI connector for that widget class accepts
  (Base/Python/slicer/parameterNodeWrapper/guiConnectors.py: connectors match exact widget
  classes; sliders need bounds, combo boxes an Enum or a Choice).
"""

from __future__ import annotations

import ast
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MODULE = REPO / "L3MuscleSeg" / "L3MuscleSeg.py"
UI = REPO / "Resources" / "UI" / "L3MuscleSeg.ui"


# ------------------------------------------------------------------ reading the .ui


def ui_object_names(ui_xml: str) -> set[str]:
    """Names ``slicer.util.childWidgetVariables`` exposes: widgets and layouts."""
    root = ET.fromstring(ui_xml)
    return {e.get("name") for e in root.iter() if e.tag in ("widget", "layout")} - {None}


def ui_parameter_bindings(ui_xml: str) -> dict[str, str]:
    """SlicerParameterName → the class of the widget that carries it."""
    bindings = {}
    for widget in ET.fromstring(ui_xml).iter("widget"):
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                name = prop.findtext("string")
                assert name not in bindings, f"{name} is bound to two widgets"
                bindings[name] = widget.get("class")
    return bindings


# ------------------------------------------------------------------ reading the module


def ui_references(source: str) -> set[str]:
    """Every ``X`` in ``self.ui.X``."""
    return {node.attr for node in ast.walk(ast.parse(source))
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
            and node.value.attr == "ui" and isinstance(node.value.value, ast.Name)
            and node.value.value.id == "self"}


def wrapper_fields(source: str) -> dict[str, ast.expr]:
    """Field name → annotation of the class decorated with ``@parameterNodeWrapper``."""
    tree = ast.parse(source)
    classes = [node for node in tree.body if isinstance(node, ast.ClassDef) and any(
        (d.id if isinstance(d, ast.Name) else getattr(d, "attr", None)) == "parameterNodeWrapper"
        for d in node.decorator_list)]
    assert len(classes) == 1, "expected exactly one @parameterNodeWrapper class"
    return {stmt.target.id: stmt.annotation for stmt in classes[0].body
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)}


def enum_classes(source: str) -> set[str]:
    return {node.name for node in ast.parse(source).body if isinstance(node, ast.ClassDef)
            and any(ast.unparse(base) in ("enum.Enum", "Enum") for base in node.bases)}


def split_annotation(annotation: ast.expr) -> tuple[str, list[str]]:
    """(base type, annotation call names) of ``T`` or ``Annotated[T, A(...), ...]``."""
    if isinstance(annotation, ast.Subscript) and ast.unparse(annotation.value) in (
            "Annotated", "typing.Annotated"):
        base, *extras = annotation.slice.elts
        return ast.unparse(base), [ast.unparse(e.func) for e in extras if isinstance(e, ast.Call)]
    return ast.unparse(annotation), []


def connector_problem(widget_class: str, annotation: ast.expr, enums: set[str]) -> str | None:
    """Why Slicer could not connect this widget to a field of this type, or None."""
    base, extras = split_annotation(annotation)
    bounded = "WithinRange" in extras or {"Minimum", "Maximum"} <= set(extras)
    accepted = {
        "qMRMLNodeComboBox": base.startswith("vtkMRML"),
        "ctkPathLineEdit": base in ("Path", "pathlib.Path"),
        "ctkDirectoryButton": base in ("Path", "pathlib.Path"),
        "QLineEdit": base == "str",
        "QLabel": base == "str",
        "QCheckBox": base == "bool",
        "QSpinBox": base == "int",
        "QSlider": base == "int" and bounded,
        "QDoubleSpinBox": base in ("float", "int"),
        "ctkDoubleSpinBox": base in ("float", "int"),
        "ctkSliderWidget": base in ("float", "int") and bounded,
        "QComboBox": base in enums or "Choice" in extras,
    }
    if widget_class not in accepted:
        return f"no connector is checked here for {widget_class}"
    if not accepted[widget_class]:
        return f"a {widget_class} cannot show a field annotated {ast.unparse(annotation)}"
    return None


def contract_problems(ui_xml: str, source: str) -> list[str]:
    names = ui_object_names(ui_xml)
    fields = wrapper_fields(source)
    enums = enum_classes(source)
    problems = [f"self.ui.{name} is not an object of the .ui"
                for name in sorted(ui_references(source) - names)]
    for parameter, widget_class in sorted(ui_parameter_bindings(ui_xml).items()):
        if parameter not in fields:
            problems.append(f"SlicerParameterName {parameter!r} has no parameter node field")
            continue
        problem = connector_problem(widget_class, fields[parameter], enums)
        if problem:
            problems.append(f"{parameter}: {problem}")
    return problems


# ------------------------------------------------------------------ the checker can fail

GOOD_UI = """<ui version="4.0"><widget class="qMRMLWidget" name="Top">
 <layout class="QVBoxLayout" name="mainLayout">
  <item><widget class="QSpinBox" name="foldSpinBox">
   <property name="SlicerParameterName" stdset="0"><string>fold</string></property></widget></item>
  <item><widget class="QComboBox" name="modeComboBox">
   <property name="SlicerParameterName" stdset="0"><string>mode</string></property></widget></item>
  <item><widget class="QPushButton" name="runButton"/></item>
 </layout></widget></ui>"""

GOOD_SOURCE = """
import enum
class Mode(enum.Enum):
    A = "a"
@parameterNodeWrapper
class P:
    fold: Annotated[int, WithinRange(0, 4)] = 0
    mode: Mode = Mode.A
class W:
    def setup(self):
        self.ui.runButton.enabled = self.ui.foldSpinBox.value > 0
        self.ui.mainLayout.addWidget(None)
"""


def test_checker_accepts_a_consistent_pair():
    assert contract_problems(GOOD_UI, GOOD_SOURCE) == []


@pytest.mark.parametrize("source_change, expected", [
    (("self.ui.runButton", "self.ui.goButton"), "self.ui.goButton is not an object of the .ui"),
    (("    mode: Mode = Mode.A\n", ""), "SlicerParameterName 'mode' has no parameter node field"),
    (("mode: Mode = Mode.A", "mode: str = 'a'"), "a QComboBox cannot show a field annotated str"),
    (("fold: Annotated[int, WithinRange(0, 4)] = 0", "fold: float = 0.0"),
     "a QSpinBox cannot show a field annotated float"),
])
def test_checker_reports_each_kind_of_mismatch(source_change, expected):
    source = GOOD_SOURCE.replace(*source_change)
    assert source != GOOD_SOURCE

    problems = contract_problems(GOOD_UI, source)

    assert len(problems) == 1 and expected in problems[0]


def test_checker_needs_bounds_for_a_slider():
    ui = GOOD_UI.replace('class="QSpinBox"', 'class="QSlider"')
    assert contract_problems(ui, GOOD_SOURCE) == []
    unbounded = GOOD_SOURCE.replace("Annotated[int, WithinRange(0, 4)]", "int")
    assert "a QSlider cannot show a field annotated int" in contract_problems(ui, unbounded)[0]


# ------------------------------------------------------------------ the real module


def test_module_and_ui_agree():
    ui_xml, source = UI.read_text(encoding="utf-8"), MODULE.read_text(encoding="utf-8")

    assert contract_problems(ui_xml, source) == []


def test_every_parameter_widget_of_the_panel_is_bound():
    """The panel's inputs are saved with the scene; widgets managed in code are listed."""
    bindings = ui_parameter_bindings(UI.read_text(encoding="utf-8"))

    assert {"inputVolume", "modelFolder", "foldMode", "fold", "device", "mirroring",
            "segmentation", "referenceSegmentation", "heightM", "exportFolder", "caseId",
            "trainDataset", "trainFolds", "trainEpochs", "trainDevice"} <= set(bindings)


def test_ui_loads_by_the_name_the_module_asks_for():
    root = ET.fromstring(UI.read_text(encoding="utf-8"))
    source = MODULE.read_text(encoding="utf-8")

    assert root.findtext("class") == "L3MuscleSeg"
    assert root.find("widget").get("class") == "qMRMLWidget"
    assert 'self.resourcePath("UI/L3MuscleSeg.ui")' in source
    custom = {c.findtext("class") for c in root.iter("customwidget")}
    used = {w.get("class") for w in root.iter("widget")}
    assert {c for c in used if c.startswith(("ctk", "qMRML"))} <= custom
