"""The Slicer extension packages every file the module needs, and its metadata agrees.

The install lists come from L3MuscleSeg/PackagedFiles.cmake, evaluated here by the real
``cmake -P`` (the same function L3MuscleSeg/CMakeLists.txt calls), and are compared with the
files of the repository. The extension metadata is checked the way the Slicer Extensions
Index checks it (scripts/check_description_files.py of Slicer/ExtensionsIndex).
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MODULE_DIR = "L3MuscleSeg"
PACKAGED_DIRS = ("L3MuscleSegLib", "Resources")
BUILD_FILES = re.compile(r"^L3MuscleSeg/(CMakeLists\.txt|[^/]+\.cmake)$")
CATALOG_KEYS = {"$schema", "category", "scm_url", "scm_revision", "scm_type",
                "build_dependencies", "build_subdirectory", "enabled", "tier"}


def cmake_lists(root: Path, tmp_path: Path) -> dict[str, list[str]]:
    """Run l3muscleseg_packaged_files() on ``root`` with the real cmake."""
    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.skip("cmake is not installed, so the CMake install lists cannot be evaluated")
    driver = tmp_path / "list_packaged_files.cmake"
    driver.write_text(
        f'include("{(REPO / MODULE_DIR / "PackagedFiles.cmake").as_posix()}")\n'
        f'l3muscleseg_packaged_files("{root.as_posix()}" MODULE LIB RESOURCES)\n'
        "foreach(kind MODULE LIB RESOURCES)\n"
        "  foreach(item IN LISTS ${kind})\n"
        '    message("${kind}|${item}")\n'
        "  endforeach()\n"
        "endforeach()\n",
        encoding="utf-8",
    )
    done = subprocess.run([cmake, "-P", str(driver)], capture_output=True, text=True, check=True)
    lists: dict[str, list[str]] = {"MODULE": [], "LIB": [], "RESOURCES": []}
    for line in done.stderr.splitlines():  # message() writes to stderr
        kind, _, item = line.partition("|")
        lists[kind].append(item)
    return lists


def repository_files(root: Path, folders: tuple[str, ...]) -> list[str]:
    """Files git tracks or would track (not ignored) under ``folders``, as posix paths."""
    if shutil.which("git") and (root / ".git").exists():
        listed = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "--", *folders],
            cwd=root, capture_output=True, text=True, check=True,
        ).stdout.splitlines()
        return sorted(p for p in listed if (root / p).is_file())
    found = []
    for folder in folders:
        for dirpath, dirnames, filenames in os.walk(root / folder):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            found += [(Path(dirpath) / f).relative_to(root).as_posix() for f in filenames
                      if not f.endswith((".pyc", ".pyo"))]
    return sorted(found)


def without_comments(cmake_text: str) -> str:
    return "\n".join(line.split("#", 1)[0] for line in cmake_text.splitlines())


# ------------------------------------------------------------------ the install lists


def test_packaged_files_of_a_known_tree(tmp_path):
    tree = tmp_path / "tree"
    files = [
        "L3MuscleSeg/L3MuscleSeg.py", "L3MuscleSeg/L3MuscleSegMRML.py",
        "L3MuscleSeg/CMakeLists.txt",
        "L3MuscleSegLib/__init__.py", "L3MuscleSegLib/commands/run.py",
        "L3MuscleSegLib/__pycache__/__init__.cpython-311.pyc",
        "L3MuscleSegLib/data/demo_model/fold_0/checkpoint_final.pth",
        "L3MuscleSegLib/data/demo_model/dataset.json",
        "Resources/UI/L3MuscleSeg.ui", "Resources/Icons/L3MuscleSeg.png",
        "tests/test_x.py",
    ]
    for name in files:
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        (tree / name).write_bytes(b"x")

    lists = cmake_lists(tree, tmp_path)

    assert lists["MODULE"] == ["L3MuscleSeg.py", "L3MuscleSegMRML.py"]
    assert lists["LIB"] == ["L3MuscleSegLib/__init__.py", "L3MuscleSegLib/commands/run.py"]
    assert lists["RESOURCES"] == [
        "L3MuscleSegLib/data/demo_model/dataset.json",
        "L3MuscleSegLib/data/demo_model/fold_0/checkpoint_final.pth",
        "Resources/Icons/L3MuscleSeg.png",
        "Resources/UI/L3MuscleSeg.ui",
    ]


def test_every_library_and_resource_file_is_packaged(tmp_path):
    lists = cmake_lists(REPO, tmp_path)
    packaged = set(lists["LIB"]) | set(lists["RESOURCES"])

    missing = [p for p in repository_files(REPO, PACKAGED_DIRS) if p not in packaged]

    assert not missing, f"not installed by the CMake rules: {missing}"
    assert all(p.endswith(".py") for p in lists["LIB"])
    assert not any(p.endswith(".py") for p in lists["RESOURCES"])
    assert "Resources/UI/L3MuscleSeg.ui" in packaged
    assert "Resources/Icons/L3MuscleSeg.png" in packaged


def test_every_module_file_is_packaged(tmp_path):
    lists = cmake_lists(REPO, tmp_path)
    module_files = repository_files(REPO, (MODULE_DIR,))

    scripts = [p for p in module_files if re.fullmatch(r"L3MuscleSeg/[^/]+\.py", p)]
    stray = [p for p in module_files if p not in scripts and not BUILD_FILES.match(p)]

    assert sorted(f"{MODULE_DIR}/{p}" for p in lists["MODULE"]) == scripts
    assert "L3MuscleSeg/L3MuscleSeg.py" in scripts
    assert not stray, (f"{stray} would not be installed: put resources in Resources/ and "
                       "library code in L3MuscleSegLib/")


def test_cmake_rules_install_the_lists():
    module_cmake = without_comments((REPO / MODULE_DIR / "CMakeLists.txt").read_text())
    top_cmake = without_comments((REPO / "CMakeLists.txt").read_text())
    flat = " ".join(module_cmake.split())

    assert "add_subdirectory(L3MuscleSeg)" in top_cmake
    assert "include(${CMAKE_CURRENT_SOURCE_DIR}/PackagedFiles.cmake)" in flat
    assert ("l3muscleseg_packaged_files(${PROJECT_SOURCE_DIR} MODULE_PYTHON_SCRIPTS "
            "LIB_PYTHON_SCRIPTS LIB_PYTHON_RESOURCES)") in flat
    assert re.search(r"slicerMacroBuildScriptedModule\(.*SCRIPTS \$\{MODULE_PYTHON_SCRIPTS\}"
                     r".*WITH_GENERIC_TESTS", flat)
    compile_call = re.search(r"ctkMacroCompilePythonScript\((.*?)\)", flat).group(1)
    for argument in ('SCRIPTS "${LIB_PYTHON_SCRIPTS}"', 'RESOURCES "${LIB_PYTHON_RESOURCES}"',
                     "SOURCE_DIR ${PROJECT_SOURCE_DIR}",
                     "DESTINATION_DIR ${CMAKE_BINARY_DIR}/${Slicer_QTSCRIPTEDMODULES_LIB_DIR}",
                     "INSTALL_DIR ${Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR}",
                     "NO_INSTALL_SUBDIR"):
        assert argument in compile_call


# ------------------------------------------------------------------ extension metadata


def cmake_setting(text: str, name: str) -> str:
    match = re.search(rf'set\s*\({name}\s*"([^"]+)"[ ]*\)', text)
    assert match, f"{name} is not set as a quoted string in CMakeLists.txt"
    return match.group(1)


def s4ext_fields() -> dict[str, str]:
    fields = {}
    for line in (REPO / "L3MuscleSeg.s4ext").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition(" ")
            fields[key] = value.strip()
    return fields


def test_extension_metadata_as_the_extensions_index_checks_it():
    text = (REPO / "CMakeLists.txt").read_text()
    project = re.findall(r"project\s*\(\s*([^\s\)\n\r]+)", text, re.IGNORECASE)

    assert project and project[0] == "L3MuscleSeg" == (REPO / "L3MuscleSeg.json").stem
    assert cmake_setting(text, "EXTENSION_CATEGORY") == "Segmentation"
    assert cmake_setting(text, "EXTENSION_ICONURL").endswith("Resources/Icons/L3MuscleSeg.png")
    # The index's pattern allows no space before the closing parenthesis here.
    assert re.search(r'set\s*\(EXTENSION_SCREENSHOTURLS\s*"([^"]+)"\)', text)
    for name in ("EXTENSION_HOMEPAGE", "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS"):
        assert all(url.startswith("https://") for url in cmake_setting(text, name).split())
    assert cmake_setting(text, "EXTENSION_DEPENDS") == "PyTorch"


def test_catalog_entry_follows_the_schema_and_agrees_with_cmake():
    entry = json.loads((REPO / "L3MuscleSeg.json").read_text())
    raw = (REPO / "L3MuscleSeg.json").read_bytes()
    text = (REPO / "CMakeLists.txt").read_text()

    assert b"\r" not in raw
    assert set(entry) <= CATALOG_KEYS
    assert {"$schema", "category", "scm_url"} <= set(entry)
    assert entry["$schema"].endswith("slicer-extension-catalog-entry-schema-v1.0.1.json#")
    assert entry["category"] == cmake_setting(text, "EXTENSION_CATEGORY")
    assert entry["build_dependencies"] == cmake_setting(text, "EXTENSION_DEPENDS").split()
    assert isinstance(entry["tier"], int) and 1 <= entry["tier"] <= 5
    repo_name = entry["scm_url"].rstrip("/").split("/")[-1].removesuffix(".git")
    assert repo_name.startswith("Slicer")  # the index's repository-name rule


def test_s4ext_agrees_with_cmake_and_catalog():
    fields = s4ext_fields()
    text = (REPO / "CMakeLists.txt").read_text()
    entry = json.loads((REPO / "L3MuscleSeg.json").read_text())

    assert fields["scm"] == "git"
    assert fields["scmurl"].removesuffix(".git") == entry["scm_url"]
    assert fields["scmrevision"] == entry["scm_revision"]
    assert fields["depends"].split() == entry["build_dependencies"]
    assert fields["category"] == entry["category"]
    assert fields["homepage"] == cmake_setting(text, "EXTENSION_HOMEPAGE")
    assert fields["iconurl"] == cmake_setting(text, "EXTENSION_ICONURL")
    assert fields["screenshoturls"] == cmake_setting(text, "EXTENSION_SCREENSHOTURLS")
    assert fields["description"] == cmake_setting(text, "EXTENSION_DESCRIPTION")
    assert fields["contributors"] == cmake_setting(text, "EXTENSION_CONTRIBUTORS")


# ------------------------------------------------------------------ loading inside Slicer

# What a fresh Slicer 5.10 has (SuperBuild/External_python-*.cmake, SimpleITK, VTK, Qt):
# anything else is installed by the module on first use, so it must not be imported while
# Slicer loads the module.
SLICER_BUNDLED = {"numpy", "scipy", "SimpleITK", "vtk", "slicer", "qt", "ctk", "requests",
                  "pydicom", "PIL", "packaging", "dateutil", "six", "SampleData"}
LOCAL_PACKAGE = "L3MuscleSegLib"


def _import_time_statements(body):
    """Statements run on import: module and class bodies, if/try/with blocks; not functions
    and not ``if TYPE_CHECKING:`` blocks."""
    for stmt in body:
        if isinstance(stmt, (ast.Import, ast.ImportFrom)):
            yield stmt
        elif isinstance(stmt, ast.If) and "TYPE_CHECKING" not in ast.unparse(stmt.test):
            yield from _import_time_statements(stmt.body + stmt.orelse)
        elif isinstance(stmt, ast.Try):
            handlers = [s for h in stmt.handlers for s in h.body]
            yield from _import_time_statements(stmt.body + handlers + stmt.orelse
                                               + stmt.finalbody)
        elif isinstance(stmt, (ast.With, ast.ClassDef)):
            yield from _import_time_statements(stmt.body)


def _local_file(dotted: str) -> Path | None:
    """The repository file of a local module name, e.g. L3MuscleSegLib.commands._common."""
    if dotted == "L3MuscleSegMRML":
        return REPO / MODULE_DIR / "L3MuscleSegMRML.py"
    if dotted.split(".")[0] != LOCAL_PACKAGE:
        return None
    base = REPO.joinpath(*dotted.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imported_names(stmt, package: str) -> list[str]:
    """Absolute module names an import statement loads (parents and submodules too)."""
    if isinstance(stmt, ast.Import):
        targets = [alias.name for alias in stmt.names]
    else:
        parts = package.split(".")
        base = ".".join(parts[: len(parts) - stmt.level + 1]) if stmt.level else ""
        module = ".".join(p for p in (base, stmt.module or "") if p)
        targets = [module] + [f"{module}.{alias.name}" for alias in stmt.names
                              if _local_file(f"{module}.{alias.name}")]
    loaded = []
    for target in targets:
        parts = target.split(".")
        loaded += [".".join(parts[: i + 1]) for i in range(len(parts))]
    return loaded


def third_party_imports_on_load(start: Path) -> dict[str, str]:
    """Top-level package → the file importing it, over everything ``start`` loads."""
    found: dict[str, str] = {}
    seen: set[Path] = set()
    queue = [(start, "")]
    while queue:
        path, package = queue.pop()
        if path in seen:
            continue
        seen.add(path)
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for stmt in _import_time_statements(tree.body):
            if isinstance(stmt, ast.ImportFrom) and stmt.module == "__future__":
                continue
            for name in _imported_names(stmt, package):
                local = _local_file(name)
                if local is not None:
                    is_package = local.name == "__init__.py"
                    queue.append((local, name if is_package else name.rpartition(".")[0]))
                elif name.split(".")[0] not in (LOCAL_PACKAGE, "L3MuscleSegMRML"):
                    found.setdefault(name.split(".")[0], path.relative_to(REPO).as_posix())
    return found


def test_import_graph_walker_follows_local_modules():
    found = third_party_imports_on_load(REPO / "L3MuscleSegLib" / "geometry.py")

    assert {"numpy", "SimpleITK"} <= set(found)
    assert "psutil" in third_party_imports_on_load(REPO / "L3MuscleSegLib" / "jobs.py")


def test_module_loads_with_only_what_slicer_bundles():
    """Slicer loads L3MuscleSeg.py at startup, before any package is installed: whatever it
    imports at module level, directly or through L3MuscleSegMRML and L3MuscleSegLib, must
    ship with Slicer. Heavier imports belong inside the functions that need them."""
    found = third_party_imports_on_load(REPO / MODULE_DIR / "L3MuscleSeg.py")
    allowed = SLICER_BUNDLED | set(sys.stdlib_module_names)

    missing = {name: where for name, where in found.items() if name not in allowed}

    assert not missing, f"imported while Slicer loads the module (package: file): {missing}"
