"""Training the 2D nnU-Net ensemble: nnU-Net's own planning, then one child process per fold.

Every nnU-Net step runs as a child process (:mod:`.jobs`) with nnU-Net's folder variables
(``nnUNet_raw``, ``nnUNet_preprocessed``, ``nnUNet_results``) set for the child only; this
process's environment is never touched. Progress is parsed from the child's log lines.
Interrupted folds resume from nnU-Net's ``checkpoint_latest.pth``; finished folds are
skipped. The summary collects each fold's validation Dice (nnU-Net's
``fold_k/validation/summary.json``) into a CSV and a PNG.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .errors import InputError, L3MuscleSegError
from .export import atomic_path
from .jobs import CancelToken, ProcessRunner, SubprocessRunner, python_command, run_checked
from .labels import MUSCLE_CLASSES

log = logging.getLogger(__name__)

CONFIGURATION = "2d"
TRAINER = "nnUNetTrainer"
PLANS = "nnUNetPlans"
MODEL_SUBFOLDER = f"{TRAINER}__{PLANS}__{CONFIGURATION}"
DEFAULT_FOLDS = (0, 1, 2, 3, 4)
DEVICES = ("auto", "cpu", "cuda", "mps")
SUMMARY_CSV = "training_summary.csv"
SUMMARY_PNG = "training_summary.png"
_DATASET_FOLDER = re.compile(r"Dataset(\d{3})_[A-Za-z0-9_-]+")
_PLAN_MODULE = "nnunetv2.experiment_planning.plan_and_preprocess_entrypoints"
_CHILD_MODULE = "L3MuscleSegLib._nnunet_child"


@dataclass(frozen=True)
class TrainingProgress:
    """One step of a training run, as parsed from nnU-Net's log (None: not known yet)."""

    stage: str  # "plan", "train", "validate", "done"
    fold: int | None = None
    epoch: int | None = None  # 0-based, as nnU-Net counts
    num_epochs: int | None = None
    train_loss: float | None = None
    val_loss: float | None = None
    pseudo_dice: tuple[float, ...] | None = None  # per foreground class
    epoch_seconds: float | None = None
    message: str = ""


ProgressCallback = Callable[[TrainingProgress], None]


@dataclass(frozen=True)
class NnunetFolders:
    """nnU-Net's three folders for one dataset."""

    raw: Path  # holds DatasetNNN_Name/
    preprocessed: Path
    results: Path
    dataset_name: str
    dataset_id: int

    @property
    def model_folder(self) -> Path:
        return self.results / self.dataset_name / MODEL_SUBFOLDER

    @property
    def plans_file(self) -> Path:
        return self.preprocessed / self.dataset_name / f"{PLANS}.json"

    def env(self) -> dict[str, str]:
        return {"nnUNet_raw": str(self.raw), "nnUNet_preprocessed": str(self.preprocessed),
                "nnUNet_results": str(self.results)}

    @classmethod
    def for_dataset(cls, dataset_dir: str | Path, results: str | Path | None = None,
                    preprocessed: str | Path | None = None) -> NnunetFolders:
        """Folders for a raw dataset; by default siblings of the raw root (``nnUNet_*``)."""
        dataset_dir = Path(dataset_dir).resolve()
        match = _DATASET_FOLDER.fullmatch(dataset_dir.name)
        if not match or not (dataset_dir / "dataset.json").is_file():
            raise InputError(
                f"'{dataset_dir}' is not an nnU-Net raw dataset folder (DatasetNNN_Name with "
                "a dataset.json). Build one with `l3muscleseg dataset build`.")
        base = dataset_dir.parent.parent
        return cls(dataset_dir.parent,
                   Path(preprocessed or base / "nnUNet_preprocessed").resolve(),
                   Path(results or base / "nnUNet_results").resolve(),
                   dataset_dir.name, int(match.group(1)))


@dataclass(frozen=True)
class FoldResult:
    fold: int
    dice: dict[str, float]  # class key → validation Dice
    mean_foreground_dice: float
    checkpoint: str


@dataclass(frozen=True)
class TrainingSummary:
    model_folder: str
    folds: tuple[FoldResult, ...]
    csv: str
    png: str


# ---------------------------------------------------------------- log parsing


_TIMESTAMP = r"(?:\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)?: )?"
_EPOCH = re.compile(_TIMESTAMP + r"Epoch (\d+)\s*$")
_TRAIN_LOSS = re.compile(_TIMESTAMP + r"train_loss (\S+)")
_VAL_LOSS = re.compile(_TIMESTAMP + r"val_loss (\S+)")
_PSEUDO_DICE = re.compile(_TIMESTAMP + r"Pseudo dice \[(.*)\]")
_EPOCH_TIME = re.compile(_TIMESTAMP + r"Epoch time: (\S+) s")
_NUMBER = re.compile(r"nan|[-+]?\d*\.?\d+(?:[eE][-+]?\d+)?")


def _floats(text: str) -> tuple[float, ...]:
    """Numbers in nnU-Net's printed lists, e.g. ``[np.float32(0.91), 0.8, nan]``."""
    return tuple(float(n) for n in _NUMBER.findall(re.sub(r"np\.float\d+\(", "(", text)))


class LogParser:
    """Turns a fold's log lines into :class:`TrainingProgress`, one per finished epoch."""

    def __init__(self, fold: int | None = None, num_epochs: int | None = None):
        self._current = TrainingProgress("train", fold=fold, num_epochs=num_epochs)

    def feed(self, line: str) -> TrainingProgress | None:
        if m := _EPOCH.match(line):
            self._current = TrainingProgress("train", self._current.fold, int(m.group(1)),
                                             self._current.num_epochs)
        elif m := _TRAIN_LOSS.match(line):
            self._current = replace(self._current, train_loss=float(m.group(1)))
        elif m := _VAL_LOSS.match(line):
            self._current = replace(self._current, val_loss=float(m.group(1)))
        elif m := _PSEUDO_DICE.match(line):
            self._current = replace(self._current, pseudo_dice=_floats(m.group(1)))
        elif m := _EPOCH_TIME.match(line):
            done = replace(self._current, epoch_seconds=float(m.group(1)))
            return replace(done, message=_describe_epoch(done))
        return None


def _describe_epoch(p: TrainingProgress) -> str:
    of = f"/{p.num_epochs}" if p.num_epochs else ""
    dice = ", ".join(f"{d:.3f}" for d in p.pseudo_dice or ())
    return (f"fold {p.fold} epoch {(p.epoch or 0) + 1}{of}: train loss {p.train_loss}, "
            f"val loss {p.val_loss}, pseudo-Dice [{dice}] ({p.epoch_seconds} s)")


# ---------------------------------------------------------------- running nnU-Net


def plan(folders: NnunetFolders, *, processes: int = 2, runner: ProcessRunner | None = None,
         progress: ProgressCallback | None = None, cancel: CancelToken | None = None) -> Path:
    """nnU-Net's dataset check, fingerprint and plans (``nnUNetv2_plan_and_preprocess --no_pp``).

    Returns the plans file; it may be edited (e.g. a smaller network) before preprocessing.
    """
    _emit(progress, TrainingProgress("plan", message=f"planning {folders.dataset_name}"))
    n = str(max(1, processes))
    argv = python_command(_PLAN_MODULE, "-d", str(folders.dataset_id), "-c", CONFIGURATION,
                          "-npfp", n, "--verify_dataset_integrity", "--no_pp", "--no_pbar")
    run_checked(runner or SubprocessRunner(), argv, env=_child_env(folders, processes),
                on_line=_log_line, cancel=cancel)
    return folders.plans_file


def preprocess(folders: NnunetFolders, *, processes: int = 2,
               runner: ProcessRunner | None = None, progress: ProgressCallback | None = None,
               cancel: CancelToken | None = None) -> None:
    """nnU-Net's 2d preprocessing with the current plans (``nnUNetv2_preprocess -c 2d``)."""
    _emit(progress, TrainingProgress("plan", message=f"preprocessing {folders.dataset_name}"))
    argv = python_command(_CHILD_MODULE, "preprocess", str(folders.dataset_id),
                          "--processes", str(max(1, processes)))
    run_checked(runner or SubprocessRunner(), argv, env=_child_env(folders, processes),
                on_line=_log_line, cancel=cancel)


def plan_and_preprocess(folders: NnunetFolders, *, processes: int = 2,
                        runner: ProcessRunner | None = None,
                        progress: ProgressCallback | None = None,
                        cancel: CancelToken | None = None) -> Path:
    """:func:`plan`, then :func:`preprocess`; returns the plans file."""
    plans_file = plan(folders, processes=processes, runner=runner, progress=progress,
                      cancel=cancel)
    preprocess(folders, processes=processes, runner=runner, progress=progress, cancel=cancel)
    return plans_file


def train_fold(folders: NnunetFolders, fold: int, *, device: str = "auto",
               epochs: int | None = None, iterations_per_epoch: int | None = None,
               val_iterations_per_epoch: int | None = None, threads: int | None = None,
               init_weights: str | Path | None = None, initial_lr: float | None = None,
               runner: ProcessRunner | None = None, progress: ProgressCallback | None = None,
               cancel: CancelToken | None = None) -> Path:
    """Train (or resume, or skip when finished) one fold; returns its checkpoint_final.pth.

    ``init_weights``: an nnU-Net checkpoint of the same network and labels whose weights
    (all layers) a new fold starts from; ignored when resuming. ``initial_lr`` replaces
    nnU-Net's 0.01, e.g. a smaller one for such fine-tuning.
    """
    fold_dir = folders.model_folder / f"fold_{fold}"
    final = fold_dir / "checkpoint_final.pth"
    if final.is_file() and (fold_dir / "validation" / "summary.json").is_file():
        _emit(progress, TrainingProgress("done", fold, message=f"fold {fold} already trained"))
        return final
    resume = final.is_file() or (fold_dir / "checkpoint_latest.pth").is_file()
    threads = threads or os.cpu_count() or 1
    argv = python_command(_CHILD_MODULE, "train", str(folders.dataset_id), str(fold), "--device",
                          _check_device(device), "--threads", str(threads),
                          *_optional("--epochs", epochs),
                          *_optional("--iterations", iterations_per_epoch),
                          *_optional("--val-iterations", val_iterations_per_epoch),
                          *_optional("--initial-lr", initial_lr),
                          *(["--continue"] if resume else
                            _optional("--init-weights", init_weights)))
    parser = LogParser(fold, epochs)
    _emit(progress, TrainingProgress("train", fold, num_epochs=epochs, message=(
        f"{'resuming' if resume else 'training'} fold {fold}")))

    def on_line(line: str) -> None:
        _log_line(line)
        if (update := parser.feed(line)) is not None:
            _emit(progress, update)
        elif "Mean Validation Dice" in line:
            _emit(progress, TrainingProgress("validate", fold, message=line.strip()))

    run_checked(runner or SubprocessRunner(), argv, env=_child_env(folders, threads),
                on_line=on_line, cancel=cancel)
    if not final.is_file():
        raise L3MuscleSegError(f"nnU-Net finished fold {fold} without writing '{final}'; "
                               f"see its log in '{fold_dir}'.")
    _emit(progress, TrainingProgress("done", fold, message=f"fold {fold} finished"))
    return final


def train(dataset_dir: str | Path, *, folds: Sequence[int] = DEFAULT_FOLDS,
          device: str = "auto", epochs: int | None = None,
          iterations_per_epoch: int | None = None, val_iterations_per_epoch: int | None = None,
          results: str | Path | None = None, preprocessed: str | Path | None = None,
          threads: int | None = None, runner: ProcessRunner | None = None,
          progress: ProgressCallback | None = None,
          cancel: CancelToken | None = None) -> TrainingSummary:
    """Plan (once) and train the given folds one after another, then write the summary."""
    folders = NnunetFolders.for_dataset(dataset_dir, results, preprocessed)
    _check_folds(folds)
    _check_device(device)
    if not is_preprocessed(folders):
        plan_and_preprocess(folders, processes=threads or os.cpu_count() or 1, runner=runner,
                            progress=progress, cancel=cancel)
    for fold in folds:
        train_fold(folders, fold, device=device, epochs=epochs,
                   iterations_per_epoch=iterations_per_epoch,
                   val_iterations_per_epoch=val_iterations_per_epoch, threads=threads,
                   runner=runner, progress=progress, cancel=cancel)
    return write_training_summary(folders.model_folder, folds)


def is_preprocessed(folders: NnunetFolders) -> bool:
    """True when plans exist and preprocessing finished (it copies the labels last)."""
    raw = json.loads((folders.raw / folders.dataset_name / "dataset.json").read_text())
    labels = folders.preprocessed / folders.dataset_name / "gt_segmentations"
    done = len(list(labels.glob("*.nii.gz"))) if labels.is_dir() else 0
    return folders.plans_file.is_file() and done == raw.get("numTraining")


def _child_env(folders: NnunetFolders, threads: int) -> dict[str, str]:
    # Data-augmentation workers share the CPU with training: one per spare core, at most 8.
    workers = min(8, max(1, threads - 1)) if threads > 1 else 0
    for folder in (folders.preprocessed, folders.results):
        folder.mkdir(parents=True, exist_ok=True)
    return {**folders.env(), "nnUNet_n_proc_DA": str(workers),
            "nnUNet_def_n_proc": str(max(1, threads)), "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


def _check_device(device: str) -> str:
    if device not in DEVICES:
        raise InputError(f"Unknown device '{device}'; use one of {', '.join(DEVICES)}.")
    return device


def _check_folds(folds: Sequence[int]) -> None:
    if not folds or any(not 0 <= f <= 4 for f in folds) or len(set(folds)) != len(folds):
        raise InputError(f"Folds {list(folds)} are not valid: give distinct folds from 0..4.")


def _optional(flag: str, value) -> list[str]:
    return [] if value is None else [flag, str(value)]


def _emit(progress: ProgressCallback | None, update: TrainingProgress) -> None:
    log.info("%s", update.message)
    if progress is not None:
        progress(update)


def _log_line(line: str) -> None:
    log.debug("nnU-Net: %s", line)


# ---------------------------------------------------------------- summary


def read_fold_result(model_folder: str | Path, fold: int) -> FoldResult:
    """A fold's validation Dice per class from nnU-Net's ``validation/summary.json``."""
    fold_dir = Path(model_folder) / f"fold_{fold}"
    summary_file = fold_dir / "validation" / "summary.json"
    if not summary_file.is_file():
        raise InputError(f"'{summary_file}' is missing: fold {fold} has not finished its "
                         "validation. Run `l3muscleseg train` again to resume it.")
    summary = json.loads(summary_file.read_text())
    dice = {c.key: float(summary["mean"][str(c.value)]["Dice"]) for c in MUSCLE_CLASSES}
    return FoldResult(fold, dice, float(summary["foreground_mean"]["Dice"]),
                      str(fold_dir / "checkpoint_final.pth"))


def write_training_summary(model_folder: str | Path, folds: Sequence[int]) -> TrainingSummary:
    """Write ``training_summary.csv`` and ``.png`` (validation Dice per fold and class)."""
    model_folder = Path(model_folder)
    results = tuple(read_fold_result(model_folder, f) for f in folds)
    csv_path, png_path = model_folder / SUMMARY_CSV, model_folder / SUMMARY_PNG
    with atomic_path(csv_path, overwrite=True) as temp, open(temp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["fold", *(c.key for c in MUSCLE_CLASSES), "mean_foreground"])
        for r in results:
            writer.writerow([r.fold, *(f"{r.dice[c.key]:.4f}" for c in MUSCLE_CLASSES),
                             f"{r.mean_foreground_dice:.4f}"])
        writer.writerow(["mean", *(f"{_mean(r.dice[c.key] for r in results):.4f}"
                                   for c in MUSCLE_CLASSES),
                         f"{_mean(r.mean_foreground_dice for r in results):.4f}"])
    with atomic_path(png_path, overwrite=True) as temp:
        _plot(results).savefig(temp)
    return TrainingSummary(str(model_folder), results, str(csv_path), str(png_path))


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def _plot(results: Sequence[FoldResult]) -> Figure:
    figure = Figure(figsize=(6, 3.5), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    width = 0.8 / len(MUSCLE_CLASSES)
    for n, cls in enumerate(MUSCLE_CLASSES):
        shift = (n - (len(MUSCLE_CLASSES) - 1) / 2) * width
        axes.bar([r.fold + shift for r in results], [r.dice[cls.key] for r in results],
                 width, color=cls.color, label=cls.name)
    axes.set_xticks([r.fold for r in results], [f"fold {r.fold}" for r in results])
    axes.set_ylim(0, 1)
    axes.set_ylabel("validation Dice")
    axes.set_title("nnU-Net cross-validation (each fold's held-out cases)")
    axes.legend(loc="lower right", fontsize="small")
    figure.tight_layout()
    return figure
