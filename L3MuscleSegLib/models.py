"""The per-user model store: install, list, verify, export and resolve trained nnU-Net models.

Layout: ROOT/NAME/VERSION/ is a plain nnU-Net model folder (dataset.json, plans.json,
fold_k/checkpoint_final.pth) plus ``manifest.json`` (SHA-256 checksums and provenance).
ROOT is an explicit ``root`` argument, else $L3MUSCLESEG_MODEL_STORE, else
~/.l3muscleseg/models. An install is staged, validated and checksummed in a hidden folder
inside ROOT and then moved into place with os.replace, so a failed install leaves nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
import zipfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

from . import __version__
from .errors import InputError, ModelError
from .export import atomic_path

if TYPE_CHECKING:  # inference imports torch: only load it when a model is checked
    from .inference import ModelInfo

log = logging.getLogger(__name__)

STORE_ENV = "L3MUSCLESEG_MODEL_STORE"
DEFAULT_STORE = Path("~") / ".l3muscleseg" / "models"
DEMO_MODEL_DIR = Path(__file__).parent / "data" / "demo_model"
DEMO_MODEL_NAME = "demo"
MANIFEST = "manifest.json"
DEFAULT_VERSION = "1"
MANIFEST_FORMAT = 1

# What an install copies: nnU-Net's own export set, never bulky validation predictions.
_TOP_LEVEL_SUFFIXES = (".json", ".md", ".txt")
_FOLD_FILES = ("checkpoint_final.pth", "debug.json", "progress.png", "validation/summary.json")
_FOLD_DIR = re.compile(r"fold_\d+")
_COMPONENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,99}")
_INSTALL_HINT = "install one with `l3muscleseg model install FOLDER_OR_ZIP`"


@dataclass(frozen=True)
class FileChecksum:
    path: str  # relative to the model folder, '/' separators
    sha256: str
    size: int


@dataclass(frozen=True)
class Manifest:
    name: str
    version: str
    label: str | None  # the model card's label, e.g. "demo, not for clinical use"
    dataset_name: str
    configuration: str
    trainer: str
    plans: str
    folds: tuple[int, ...]
    label_names: Mapping[int, str]  # nnU-Net label id → dataset.json name
    label_mapping: Mapping[int, int]  # nnU-Net label id → class value (labels.py)
    num_training: int | None  # numTraining from dataset.json
    trained_at: str | None  # newest checkpoint mtime, ISO 8601 UTC
    installed_at: str  # ISO 8601 UTC
    source: str
    nnunetv2_version: str
    l3muscleseg_version: str
    files: tuple[FileChecksum, ...]

    @property
    def nnunet_folder(self) -> str:
        """DatasetXXX/Trainer__Plans__conf: where nnU-Net's export zips put the model."""
        return f"{self.dataset_name}/{self.trainer}__{self.plans}__{self.configuration}"

    def to_json(self) -> str:
        return json.dumps({"format": MANIFEST_FORMAT, **asdict(self)}, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        data = json.loads(text)
        data.pop("format", None)
        data["folds"] = tuple(data["folds"])
        for key in ("label_names", "label_mapping"):  # JSON object keys are strings
            data[key] = {int(k): v for k, v in data[key].items()}
        data["files"] = tuple(FileChecksum(**entry) for entry in data["files"])
        return cls(**data)


@dataclass(frozen=True)
class InstalledModel:
    name: str
    version: str
    path: Path
    label: str | None
    folds: tuple[int, ...]
    manifest: Manifest

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}"


@dataclass(frozen=True)
class FileProblem:
    path: str
    expected_sha256: str
    actual_sha256: str | None  # None: the file is missing


@dataclass(frozen=True)
class VerifyReport:
    name: str
    version: str
    path: Path
    source: str | None  # where it was installed from (None: manifest unreadable)
    problems: tuple[FileProblem, ...] = ()
    error: str | None = None  # the manifest itself is missing or unreadable

    @property
    def ok(self) -> bool:
        return not self.problems and self.error is None


def store_root(root: str | Path | None = None) -> Path:
    """The store folder: ``root`` if given, else $L3MUSCLESEG_MODEL_STORE, else the default."""
    if root is not None:
        return Path(root).expanduser()
    return Path(os.environ.get(STORE_ENV) or DEFAULT_STORE).expanduser()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# --- install -------------------------------------------------------------------------------


def install_model(source: str | Path, *, name: str | None = None, version: str | None = None,
                  force: bool = False, root: str | Path | None = None) -> InstalledModel:
    """Install a trained nnU-Net results folder or export zip as ROOT/NAME/VERSION.

    NAME defaults to the model card's name, else the dataset name (made folder-safe);
    VERSION to the card's version, else "1". An existing NAME/VERSION is replaced only with
    ``force``.
    """
    source = Path(source).expanduser()
    if not source.exists():
        raise ModelError(f"Model source {source} does not exist; pass a trained nnU-Net "
                         "results folder or a zip written by nnUNetv2_export_model_to_zip.")
    root = store_root(root)
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".install-", dir=root))
    try:
        folder, shown_as = _unpacked_model_folder(source, staging)
        _validate(folder, shown_as)  # first the source: messages describe the user's files
        staged = staging / "model"
        _copy_model_files(folder, staged)
        info = _validate(staged, shown_as)  # then the copy: what is installed is complete
        name = _check_component(name, "name") if name else _default_component(
            info.card.get("name") or info.dataset_name, "name")
        version = _check_component(version, "version") if version else _default_component(
            info.card.get("version") or DEFAULT_VERSION, "version")
        target = root / name / version
        _refuse_existing(target, force)
        manifest = _build_manifest(staged, info, name, version, source)
        (staged / MANIFEST).write_text(manifest.to_json(), encoding="utf-8")
        _move_into_place(staged, target, staging)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("Installed %s:%s into %s", name, version, target)
    return _installed(target, manifest)


def install_demo_model(*, name: str | None = None, force: bool = False,
                       root: str | Path | None = None) -> InstalledModel:
    """Install the demo model shipped inside the package (named "demo" unless told)."""
    if not DEMO_MODEL_DIR.is_dir():
        raise ModelError(f"The demo model is not shipped with this installation (expected "
                         f"{DEMO_MODEL_DIR}); reinstall l3muscleseg or install a model folder.")
    return install_model(DEMO_MODEL_DIR, name=name or DEMO_MODEL_NAME, force=force, root=root)


def _unpacked_model_folder(source: Path, staging: Path) -> tuple[Path, str]:
    """The nnU-Net model folder inside ``source`` (a folder or zip), and how to name it."""
    if source.is_dir():
        folder = _find_model_folder(source, str(source))
        return folder, str(folder)
    if not zipfile.is_zipfile(source):
        raise ModelError(f"Model source {source} is neither a folder nor a zip file; pass a "
                         "trained nnU-Net results folder or an nnU-Net export zip.")
    unpacked = staging / "unpacked"
    _extract_zip(source, unpacked)
    folder = _find_model_folder(unpacked, str(source))
    inner = folder.relative_to(unpacked).as_posix()
    return folder, f"{source}:{inner}" if inner != "." else str(source)


def _extract_zip(zip_path: Path, dest: Path) -> None:
    """Extract every member, keeping the stored modification times (the training date)."""
    dest.mkdir()
    with zipfile.ZipFile(zip_path) as archive:
        for member in archive.infolist():
            target = (dest / member.filename).resolve()
            if not target.is_relative_to(dest.resolve()):
                raise ModelError(f"Zip {zip_path} holds the unsafe member {member.filename!r} "
                                 "(it would land outside the model folder); not installing.")
            archive.extract(member, dest)
            if not member.is_dir():
                stamp = time.mktime(member.date_time + (0, 0, -1))
                os.utime(target, (stamp, stamp))


def _find_model_folder(folder: Path, shown_as: str) -> Path:
    """``folder`` itself, or the one model folder (plans.json) up to two levels below it."""
    if (folder / "plans.json").is_file():
        return folder
    candidates = sorted(plans.parent for pattern in ("*/plans.json", "*/*/plans.json")
                        for plans in folder.glob(pattern))
    if len(candidates) > 1:  # e.g. an export zip with several configurations: prefer 2d
        candidates = [c for c in candidates if c.name.endswith("__2d")] or candidates
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise ModelError(
            f"No nnU-Net model folder (one with plans.json, dataset.json and fold_k/"
            f"checkpoint_final.pth) in {shown_as}; pass the trained results folder, e.g. "
            "nnUNet_results/Dataset711_L3SM/nnUNetTrainer__nnUNetPlans__2d, or a zip written "
            "by nnUNetv2_export_model_to_zip.")
    listed = ", ".join(c.relative_to(folder).as_posix() for c in candidates)
    raise ModelError(f"{shown_as} holds several model folders ({listed}); pass the one to "
                     "install.")


def _copy_model_files(folder: Path, staged: Path) -> None:
    """Copy the top-level metadata and each fold's checkpoint, keeping modification times."""
    staged.mkdir()
    for item in sorted(folder.iterdir()):
        if item.is_file() and item.suffix in _TOP_LEVEL_SUFFIXES and item.name != MANIFEST:
            shutil.copy2(item, staged / item.name)
        elif item.is_dir() and _FOLD_DIR.fullmatch(item.name):
            (staged / item.name).mkdir()
            for relative in _FOLD_FILES:
                if (item / relative).is_file():
                    (staged / item.name / relative).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(item / relative, staged / item.name / relative)


def _validate(folder: Path, shown_as: str) -> ModelInfo:
    from .inference import validate_model_folder

    try:
        return validate_model_folder(folder)
    except ModelError as err:
        raise ModelError(str(err).replace(str(folder), shown_as)) from None


def _check_component(value: str, what: str) -> str:
    value = str(value)
    if not _COMPONENT.fullmatch(value):
        raise InputError(f"Model {what} {value!r} is not usable as a folder name: use letters, "
                         "digits, '.', '_', '+' or '-' (no ':' or '/'), starting with a letter "
                         f"or digit; pass --{what} to choose one.")
    return value


def _default_component(value, what: str) -> str:
    """A card or dataset name made folder-safe: "L3 phantom demo" → "L3-phantom-demo"."""
    return _check_component(re.sub(r"[^A-Za-z0-9._+-]+", "-", str(value)).strip("-._+"), what)


def _refuse_existing(target: Path, force: bool) -> None:
    if target.exists() and not force:
        raise ModelError(f"Model {target.parent.name}:{target.name} is already installed in "
                         f"{target}; pass --force to replace it, or --version to install "
                         "alongside it.")


def _build_manifest(staged: Path, info: ModelInfo, name: str, version: str,
                    source: Path) -> Manifest:
    dataset = json.loads((staged / "dataset.json").read_text(encoding="utf-8"))
    files = tuple(FileChecksum(path.relative_to(staged).as_posix(), sha256_file(path),
                               path.stat().st_size)
                  for path in sorted(p for p in staged.rglob("*") if p.is_file()))
    checkpoints = list(staged.glob("fold_*/checkpoint_final.pth"))
    trained = max((p.stat().st_mtime for p in checkpoints), default=None)
    return Manifest(
        name=name, version=version, label=info.card_label,
        dataset_name=info.dataset_name, configuration=info.configuration,
        trainer=info.trainer or "nnUNetTrainer", plans=info.plans or "nnUNetPlans",
        folds=tuple(info.folds_found), label_names=dict(info.label_names),
        label_mapping=dict(info.label_mapping),
        num_training=dataset.get("numTraining"),
        trained_at=_iso(trained) if trained is not None else None,
        installed_at=_iso(time.time()), source=str(source.resolve()),
        nnunetv2_version=_package_version("nnunetv2"),
        l3muscleseg_version=__version__, files=files,
    )


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, tz=timezone.utc).isoformat(timespec="seconds")


def _package_version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "unknown"


def _move_into_place(staged: Path, target: Path, staging: Path) -> None:
    """os.replace the staged folder onto ``target``; an old version is put back on failure."""
    target.parent.mkdir(exist_ok=True)
    replaced = staging / "replaced"
    if target.exists():
        os.replace(target, replaced)
    try:
        os.replace(staged, target)
    except OSError:
        if replaced.exists():
            os.replace(replaced, target)
        elif not any(target.parent.iterdir()):
            target.parent.rmdir()
        raise


# --- query ---------------------------------------------------------------------------------


def read_manifest(model_dir: str | Path) -> Manifest:
    path = Path(model_dir) / MANIFEST
    try:
        return Manifest.from_json(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(f"{path} is missing: this folder was not installed by "
                         "`l3muscleseg model install`; reinstall the model.") from None
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise ModelError(f"{path} is unreadable ({err}); reinstall the model with "
                         "`l3muscleseg model install SOURCE --force`.") from None


def list_models(root: str | Path | None = None) -> list[InstalledModel]:
    """Every installed model, by name then natural version order; broken entries are logged."""
    models = []
    for folder in _version_folders(store_root(root)):
        try:
            models.append(_installed(folder, read_manifest(folder)))
        except ModelError as err:
            log.warning("Skipping %s: %s", folder, err)
    return sorted(models, key=lambda m: (m.name, version_key(m.version)))


def find_model(name: str, version: str | None = None,
               root: str | Path | None = None) -> InstalledModel:
    """The installed NAME:VERSION, or NAME's latest version when ``version`` is None."""
    models = list_models(root)
    versions = [m for m in models if m.name == name]
    if not versions:
        raise _unknown_name(name, store_root(root), {m.name for m in models})
    if version is None:
        return versions[-1]
    for model in versions:
        if model.version == version:
            return model
    raise ModelError(f"Model {name!r} has no version {version!r}; installed versions: "
                     f"{', '.join(m.version for m in versions)}.")


def resolve_model(name_or_dir: str | Path, root: str | Path | None = None) -> Path:
    """A model folder from a directory path, NAME, or NAME:VERSION (latest when not given).

    An existing directory wins over an installed name; a value with a path separator that is
    not a directory is an error, never looked up as a name. ``demo``, when no model of that
    name is installed, is the bundled demo model (not for clinical use).
    """
    text = str(name_or_dir)
    path = Path(text).expanduser()
    if path.is_dir():
        return path
    if isinstance(name_or_dir, Path) or "/" in text or "\\" in text or os.sep in text:
        raise ModelError(f"Model folder {text} does not exist; pass an existing nnU-Net model "
                         "folder or the NAME[:VERSION] of an installed model.")
    name, _, version = text.partition(":")
    try:
        return find_model(name, version or None, root).path
    except ModelError:
        if text == DEMO_MODEL_NAME and DEMO_MODEL_DIR.is_dir():
            log.info("Using the bundled demo model (demo, not for clinical use).")
            return DEMO_MODEL_DIR
        raise


def version_key(version: str) -> tuple:
    """Natural sort key: "1.10" after "1.9", "v2" after "v1"."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part)
                 for part in re.split(r"(\d+)", version) if part)


def _version_folders(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return [version for name in sorted(root.iterdir()) if _visible_dir(name)
            for version in sorted(name.iterdir()) if _visible_dir(version)]


def _visible_dir(path: Path) -> bool:
    return path.is_dir() and not path.name.startswith(".")


def _installed(folder: Path, manifest: Manifest) -> InstalledModel:
    return InstalledModel(name=folder.parent.name, version=folder.name, path=folder,
                          label=manifest.label, folds=manifest.folds, manifest=manifest)


# --- maintenance ---------------------------------------------------------------------------


def remove_model(name: str, version: str | None = None,
                 root: str | Path | None = None) -> list[Path]:
    """Delete NAME:VERSION, or every version of NAME; returns the removed folders."""
    root = store_root(root)
    folders = _named_folders(root, name, version)
    for folder in folders:
        trash = Path(tempfile.mkdtemp(prefix=".remove-", dir=root))
        os.replace(folder, trash / "model")
        shutil.rmtree(trash)
        log.info("Removed %s:%s", name, folder.name)
    if not any((root / name).iterdir()):
        (root / name).rmdir()
    return folders


def verify_models(name: str | None = None, version: str | None = None,
                  root: str | Path | None = None) -> list[VerifyReport]:
    """Re-hash every file listed in each manifest (all models, or NAME[:VERSION])."""
    root = store_root(root)
    folders = _version_folders(root) if name is None else _named_folders(root, name, version)
    return [verify_folder(folder) for folder in folders]


def verify_folder(folder: Path) -> VerifyReport:
    try:
        manifest = read_manifest(folder)
    except ModelError as err:
        return VerifyReport(folder.parent.name, folder.name, folder, None, error=str(err))
    problems = []
    for entry in manifest.files:
        path = folder / entry.path
        actual = sha256_file(path) if path.is_file() else None
        if actual != entry.sha256:
            problems.append(FileProblem(entry.path, entry.sha256, actual))
    return VerifyReport(folder.parent.name, folder.name, folder, manifest.source,
                        tuple(problems))


def export_model(name: str, zip_path: str | Path, *, version: str | None = None,
                 overwrite: bool = False, root: str | Path | None = None) -> Path:
    """Write NAME[:VERSION] as a zip in nnU-Net's export layout (DatasetXXX/Trainer__Plans__conf/).

    The checksums are verified first, so a corrupted model is never passed on. The zip is
    accepted by `model install` and by nnUNetv2_install_pretrained_model_from_zip.
    """
    model = find_model(name, version, root)
    report = verify_folder(model.path)
    if not report.ok:
        problems = "; ".join(problem_lines(report))
        raise ModelError(f"Model {model.ref} failed its checksum check ({problems}); reinstall "
                         "it before exporting.")
    zip_path = Path(zip_path).expanduser()
    members = [entry.path for entry in model.manifest.files] + [MANIFEST]
    with atomic_path(zip_path, overwrite) as temp, \
            zipfile.ZipFile(temp, "w", zipfile.ZIP_DEFLATED) as archive:
        for member in members:
            archive.write(model.path / member, f"{model.manifest.nnunet_folder}/{member}")
    log.info("Exported %s to %s", model.ref, zip_path)
    return zip_path


def problem_lines(report: VerifyReport) -> list[str]:
    """One line per problem: which file, expected vs actual hash."""
    if report.error:
        return [report.error]
    return [f"{p.path}: missing (expected sha256 {p.expected_sha256})" if p.actual_sha256 is None
            else f"{p.path}: sha256 is {p.actual_sha256}, the manifest expects {p.expected_sha256}"
            for p in report.problems]


def _named_folders(root: Path, name: str, version: str | None) -> list[Path]:
    """NAME's version folders (or the one VERSION), even where a manifest is broken."""
    folders = [f for f in _version_folders(root) if f.parent.name == name
               and (version is None or f.name == version)]
    if folders:
        return sorted(folders, key=lambda f: version_key(f.name))
    if version is not None and (root / name).is_dir():
        present = ", ".join(f.name for f in _version_folders(root) if f.parent.name == name)
        raise ModelError(f"Model {name!r} has no version {version!r}; installed versions: "
                         f"{present or 'none'}.")
    raise _unknown_name(name, root, {f.parent.name for f in _version_folders(root)})


def _unknown_name(name: str, root: Path, installed: set[str]) -> ModelError:
    listed = ", ".join(sorted(installed)) or f"none ({_INSTALL_HINT})"
    return ModelError(f"No model named {name!r} is installed in {root}; installed: {listed}.")
