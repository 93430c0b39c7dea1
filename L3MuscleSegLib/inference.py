"""Model-folder validation and the Segmenter: nnU-Net v2's own predictor, kept warm.

A model folder is an nnU-Net v2 results folder (``dataset.json``, ``plans.json``,
``fold_k/checkpoint_final.pth``), optionally with an ``l3muscleseg_model.json`` model card.
:func:`validate_model_folder` checks it and explains what is wrong; :class:`Segmenter`
loads it once through ``nnUNetPredictor`` and segments canonical axial slices.

Nothing about nnU-Net is re-implemented: preprocessing is the plan's own preprocessor,
the sliding window (Gaussian weighting, mirroring TTA) is
``nnUNetPredictor.predict_sliding_window_return_logits``, and resampling back to the input
grid is ``convert_predicted_logits_to_segmentation_with_correct_shape``. Two things differ
from ``nnUNetv2_predict``, on purpose:

* **Ensemble.** nnU-Net averages the folds' *logits* (then applies softmax). The study
  averages the folds' *softmax probabilities*, each resampled to the input grid first, and
  takes the argmax of that mean. When the folds agree, the label maps differ only at a few
  uncertain boundary pixels (the fidelity test asks for Dice ≥ 0.99 per class); with one
  fold they are identical. When one fold is confidently wrong (say, it misses the psoas),
  the rules part: the probability mean follows the majority of folds, while a logit mean
  can be pulled over by the one fold with the largest logits.
* **Input.** The slice arrives as an array, not a file. It is given to nnU-Net as
  ``SimpleITKIO`` reads a 2D image: array ``(1 channel, 1, rows, cols)`` and spacing
  ``[999 × max(row mm, col mm), row mm, col mm]`` (SimpleITK's x, y spacing reversed to
  match the array axes, plus nnU-Net's "very thick" out-of-plane spacing). Resampling is
  then purely in-plane, whatever the CT's slice thickness. The result equals what
  ``nnUNetv2_predict`` writes for the slice saved as a one-slice LPS NIfTI of any
  thickness ≥ a third of the pixel spacing (thinner, and nnU-Net would treat an in-plane
  axis as the low-resolution one and resample it with nearest neighbours).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from time import perf_counter
from types import MappingProxyType
from typing import Any, Protocol

import numpy as np
import torch

from .errors import CancelledError, InputError, ModelError
from .geometry import AxialSlice
from .labels import ABDOMINAL_WALL, BACKGROUND, LABEL_VALUES, MUSCLE_CLASSES, PARASPINAL, PSOAS
from .qc import QCScore, fold_agreement

log = logging.getLogger(__name__)

DEFAULT_CHECKPOINT = "checkpoint_final.pth"
MODEL_CARD = "l3muscleseg_model.json"
DEVICES = ("auto", "cpu", "cuda", "mps")
_OTHER_CHECKPOINTS = ("checkpoint_final.pth", "checkpoint_best.pth", "checkpoint_latest.pth")
_FOLD_DIR = re.compile(r"fold_(\d+)$")
_OUT_OF_PLANE_FACTOR = 999.0  # SimpleITKIO's spacing for the missing axis of 2D images

# dataset.json label names accepted for each class, after _normalise_name (lower case,
# words joined by single spaces, "muscle(s)" and left/right dropped).
LABEL_SYNONYMS: dict[int, tuple[str, ...]] = {
    PSOAS.value: ("psoas", "psoas major", "iliopsoas"),
    PARASPINAL.value: ("paraspinal", "paraspinals", "paraspinous", "erector spinae",
                       "autochthon", "back"),
    ABDOMINAL_WALL.value: ("abdominal wall", "abdominal", "abdominal wall group"),
}
_BACKGROUND_NAMES = ("background",)
_SIDE_WORDS = {"left", "right", "l", "r"}

Progress = Callable[[int, int, str], None]


class CancelFlag(Protocol):
    def is_set(self) -> bool: ...


# ---------------------------------------------------------------- validation


@dataclass(frozen=True)
class ModelInfo:
    """What a validated model folder holds."""

    path: Path
    folds_found: tuple[int, ...]  # folds whose checkpoint exists
    folds: tuple[int, ...]  # folds selected for use
    dataset_name: str
    configuration: str
    trainer: str
    plans: str
    checkpoint: str
    label_names: Mapping[int, str]  # nnU-Net label id → dataset.json name
    label_mapping: Mapping[int, int]  # nnU-Net label id → our class value (labels.py)
    mirror_axes: tuple[int, ...] | None
    card: Mapping[str, Any] = field(default_factory=dict)  # l3muscleseg_model.json, if any

    @property
    def card_label(self) -> str | None:
        """The model card's label, e.g. "demo, not for clinical use"."""
        label = self.card.get("label")
        return str(label) if label else None

    @property
    def summary(self) -> str:
        """One line for the GUI, e.g. "5 folds found (0–4), 2d, labels OK"."""
        n = len(self.folds_found)
        text = f"{n} fold{'s' * (n != 1)} found ({format_folds(self.folds_found)}), " \
               f"{self.configuration}, labels OK"
        if self.folds != self.folds_found:
            text += f", using {format_folds(self.folds)}"
        return f"{text} — {self.card_label}" if self.card_label else text


def validate_model_folder(path: str | Path, checkpoint: str = DEFAULT_CHECKPOINT,
                          label_mapping: Mapping[int, int] | None = None,
                          folds: str | Sequence[int] = "all") -> ModelInfo:
    """Check an nnU-Net v2 model folder; raise ModelError saying what is wrong and the fix.

    ``folds="all"`` selects every ``fold_k`` folder and requires each to hold
    ``checkpoint``; a sequence selects those folds only. ``label_mapping`` maps nnU-Net
    label ids to our class values (0 background, 1 psoas, 2 paraspinal, 3 abdominal wall)
    when dataset.json's label names are not recognised.
    """
    path = Path(path).expanduser()
    _check_is_model_folder(path)
    dataset = _read_json(path / "dataset.json")
    plans = _read_json(path / "plans.json")
    folds_found = _folds_with_checkpoint(path, checkpoint)
    selected = _select_folds(path, checkpoint, folds, folds_found)
    first = _peek_checkpoint(path / f"fold_{selected[0]}" / checkpoint)
    configuration = str(first["init_args"]["configuration"])
    _check_configuration(path, plans, configuration)
    names = _label_names(path, dataset)
    mapping = (_explicit_mapping(names, label_mapping) if label_mapping is not None
               else _mapping_by_name(path, names))
    mirror = first.get("inference_allowed_mirroring_axes")
    return ModelInfo(
        path=path,
        folds_found=folds_found,
        folds=selected,
        dataset_name=str(plans.get("dataset_name") or dataset.get("name") or path.name),
        configuration=configuration,
        trainer=str(first.get("trainer_name", "")),
        plans=str(plans.get("plans_name", "")),
        checkpoint=checkpoint,
        label_names=MappingProxyType(names),
        label_mapping=MappingProxyType(mapping),
        mirror_axes=tuple(int(a) for a in mirror) if mirror is not None else None,
        card=MappingProxyType(_read_card(path)),
    )


def format_folds(folds: Sequence[int]) -> str:
    """(0, 1, 2, 3, 4) → "0–4"; (0, 2, 3) → "0, 2, 3"."""
    folds = sorted(folds)
    if len(folds) > 2 and folds == list(range(folds[0], folds[-1] + 1)):
        return f"{folds[0]}–{folds[-1]}"
    return ", ".join(str(f) for f in folds)


def _check_is_model_folder(path: Path) -> None:
    if not path.is_dir():
        raise ModelError(
            f"Model folder not found: '{path}'. Pass the nnU-Net results folder that holds "
            "dataset.json, plans.json and fold_0 … fold_4 (e.g. …/nnUNetTrainer__nnUNetPlans__2d)."
        )
    missing = [n for n in ("dataset.json", "plans.json") if not (path / n).is_file()]
    if not missing:
        return
    inner = sorted(p.name for p in path.iterdir() if (p / "plans.json").is_file())
    if inner:
        hint = f"It contains model folder(s) {', '.join(inner)}: pass one of those."
    elif _FOLD_DIR.match(path.name) and (path.parent / "plans.json").is_file():
        hint = f"'{path.name}' is one fold: pass its parent folder '{path.parent}'."
    else:
        hint = "Copy the whole trained-model folder, not only the checkpoints."
    raise ModelError(
        f"'{path}' is not an nnU-Net model folder: {' and '.join(missing)} missing. {hint}"
    )


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ModelError(
            f"Cannot read '{path}': {err}. Restore it from the trained model folder."
        ) from None


def _read_card(path: Path) -> dict:
    card = path / MODEL_CARD
    return _read_json(card) if card.is_file() else {}


def _fold_dirs(path: Path) -> dict[int, Path]:
    found = {}
    for child in path.iterdir():
        match = _FOLD_DIR.match(child.name)
        if match and child.is_dir():
            found[int(match.group(1))] = child
    return dict(sorted(found.items()))


def _folds_with_checkpoint(path: Path, checkpoint: str) -> tuple[int, ...]:
    return tuple(k for k, d in _fold_dirs(path).items() if (d / checkpoint).is_file())


def _select_folds(path: Path, checkpoint: str, folds, folds_found: tuple[int, ...]
                  ) -> tuple[int, ...]:
    present = _fold_dirs(path)
    if not present:
        raise ModelError(
            f"'{path}' has no fold_k folders. Train at least one fold "
            "(nnUNetv2_train DATASET 2d 0) or point to the folder that holds them."
        )
    if isinstance(folds, str):
        if folds != "all":
            raise InputError(f"folds must be 'all' or a list of fold numbers; got '{folds}'.")
        wanted = tuple(present)
    else:
        wanted = tuple(dict.fromkeys(int(f) for f in folds))
        if not wanted:
            raise InputError("folds is empty: pass 'all' or at least one fold number.")
    absent = [k for k in wanted if k not in present]
    if absent:
        raise ModelError(
            f"{', '.join(f'fold_{k}' for k in absent)} not found in '{path}'; folds present: "
            f"{format_folds(tuple(present))}. Pick folds from those."
        )
    unfinished = [k for k in wanted if k not in folds_found]
    if unfinished:
        raise ModelError(_unfinished_message(path, checkpoint, unfinished, present, folds_found))
    return wanted


def _unfinished_message(path, checkpoint, unfinished, present, folds_found) -> str:
    found = {k: [c for c in _OTHER_CHECKPOINTS if c != checkpoint and (present[k] / c).is_file()]
             for k in unfinished}
    problems = [f"fold_{k} has no {checkpoint}; "
                + (f"found {', '.join(others)}" if others else "no other checkpoint either")
                for k, others in found.items()]
    fixes = [f"pass checkpoint='{c}'" for c in ("checkpoint_final.pth", "checkpoint_best.pth")
             if c != checkpoint and all(c in others for others in found.values())]
    note = ""
    if checkpoint == DEFAULT_CHECKPOINT:
        note = " — training did not finish"
        fixes.append("finish training (nnUNetv2_train DATASET 2d FOLD --c)")
    if folds_found:
        fixes.append(f"use only the folds that have it: folds={list(folds_found)}")
    return f"In '{path}': {'; '.join(problems)}{note}. To fix: {', or '.join(fixes)}."


def _peek_checkpoint(file: Path) -> dict:
    """A checkpoint's metadata; mmap leaves the tensors on disk, so this is cheap."""
    try:
        try:
            checkpoint = torch.load(file, map_location="cpu", weights_only=False, mmap=True)
        except RuntimeError:  # files from torch < 1.6 cannot be memory-mapped
            checkpoint = torch.load(file, map_location="cpu", weights_only=False)
    except Exception as err:  # torch raises many types for corrupt or truncated files
        raise ModelError(
            f"Cannot read checkpoint '{file}' ({type(err).__name__}: {err}). The file is "
            "damaged or incomplete: copy it again from the training machine."
        ) from None
    if not isinstance(checkpoint, dict) or "network_weights" not in checkpoint or \
            "configuration" not in checkpoint.get("init_args", {}):
        raise ModelError(
            f"'{file}' is not a checkpoint written by nnU-Net v2's nnUNetTrainer (no "
            "network_weights or init_args). Use the checkpoint_final.pth of a training run."
        )
    return checkpoint


def _check_configuration(path: Path, plans: dict, configuration: str) -> None:
    configurations = plans.get("configurations", {})
    if configuration not in configurations:
        raise ModelError(
            f"The checkpoints in '{path}' were trained with configuration "
            f"'{configuration}', which plans.json does not define (it has "
            f"{', '.join(configurations) or 'none'}). Copy the plans.json that belongs to them."
        )
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    patch = PlansManager(plans).get_configuration(configuration).patch_size
    if len(patch) != 2:
        raise ModelError(
            f"'{path}' holds a {configuration} model (patch size {list(patch)}). L3MuscleSeg "
            "segments one axial slice and needs a 2d model: train it with "
            "'nnUNetv2_train DATASET 2d FOLD' and pass the …__2d folder."
        )
    transpose = list(plans.get("transpose_forward", [0, 1, 2]))
    if transpose[0] != 0:
        raise ModelError(
            f"'{path}' plans.json has transpose_forward {transpose}: its 2d model cuts "
            "slices along an in-plane axis. That happens when the training NIfTIs' slice "
            "thickness was smaller than their pixel spacing; rewrite them with a thickness "
            "at least the pixel spacing, then plan and train again."
        )


def _label_names(path: Path, dataset: dict) -> dict[int, str]:
    labels = dataset.get("labels")
    if not isinstance(labels, dict) or not labels:
        raise ModelError(f"'{path / 'dataset.json'}' has no 'labels' table. Restore it.")
    names = {}
    for name, value in labels.items():
        if name == "ignore" or not isinstance(value, int):
            raise ModelError(
                f"'{path / 'dataset.json'}' label '{name}': {value!r} is a region or ignore "
                "label. L3MuscleSeg needs a plain label model (one integer per class)."
            )
        names[value] = name
    return dict(sorted(names.items()))


def _normalise_name(name: str) -> str:
    words = re.sub(r"[^a-z0-9]+", " ", name.lower()).split()
    return " ".join(w for w in words if w not in _SIDE_WORDS | {"muscle", "muscles", "m"})


def _class_for_name(name: str) -> int | None:
    key = _normalise_name(name)
    if key in _BACKGROUND_NAMES:
        return BACKGROUND
    for value, synonyms in LABEL_SYNONYMS.items():
        if key in synonyms:
            return value
    return None


def _mapping_by_name(path: Path, names: dict[int, str]) -> dict[int, int]:
    mapping = {nid: _class_for_name(name) for nid, name in names.items()}
    mapping[0] = BACKGROUND  # nnU-Net reserves id 0 for background, whatever its name
    unknown = [nid for nid, value in mapping.items() if value is None]
    if unknown:
        example = {nid: value or 0 for nid, value in mapping.items()}
        raise ModelError(
            f"dataset.json label(s) {', '.join(f'{names[n]!r} (id {n})' for n in unknown)} in "
            f"'{path}' do not map onto {_class_list()}. Rename them in dataset.json, or pass "
            "label_mapping (nnU-Net id → 0 background, 1 psoas, 2 paraspinal, 3 abdominal "
            f"wall), e.g. {example} to count them as background."
        )
    _check_all_classes(mapping, f"The dataset.json labels in '{path}'")
    return mapping


def _explicit_mapping(names: dict[int, str], label_mapping: Mapping[int, int]) -> dict[int, int]:
    mapping = {int(k): int(v) for k, v in label_mapping.items()}
    uncovered = [f"{nid} ('{names[nid]}')" for nid in names if nid not in mapping]
    unknown_ids = [nid for nid in mapping if nid not in names]
    bad_values = {nid: v for nid, v in mapping.items() if v not in LABEL_VALUES}
    if uncovered or unknown_ids or bad_values:
        problems = ([f"nnU-Net ids {', '.join(uncovered)} not mapped"] if uncovered else []) \
            + ([f"ids {unknown_ids} not in dataset.json"] if unknown_ids else []) \
            + ([f"values {bad_values} are not class values"] if bad_values else [])
        raise ModelError(
            f"label_mapping {mapping} is invalid: {'; '.join(problems)}. Map every dataset.json "
            f"id ({', '.join(f'{k}: {v}' for k, v in names.items())}) to 0 background, 1 psoas, "
            "2 paraspinal or 3 abdominal wall."
        )
    _check_all_classes(mapping, "label_mapping")
    return dict(sorted(mapping.items()))


def _check_all_classes(mapping: dict[int, int], what: str) -> None:
    missing = [c for c in MUSCLE_CLASSES if c.value not in mapping.values()]
    if missing:
        accepted = "; ".join(f"{c.name.lower()}: {', '.join(LABEL_SYNONYMS[c.value])}"
                             for c in missing)
        raise ModelError(
            f"{what}: nothing maps to {', '.join(c.name.lower() for c in missing)}. Accepted "
            f"dataset.json names (case, _ and left/right ignored) — {accepted}. Or pass "
            "label_mapping."
        )


def _class_list() -> str:
    return "/".join(c.name.lower() for c in MUSCLE_CLASSES)


# ---------------------------------------------------------------- devices and threads


def resolve_device(requested: str = "auto") -> torch.device:
    """auto: CUDA, else MPS, else CPU. An unavailable CUDA/MPS falls back to the CPU."""
    if requested not in DEVICES:
        raise InputError(f"Unknown device '{requested}'; use one of {', '.join(DEVICES)}.")
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if requested == "auto":
        return torch.device(next((d for d in ("cuda", "mps") if available[d]), "cpu"))
    if requested != "cpu" and not available[requested]:
        log.warning("Device '%s' was requested but is not available to torch %s; using the "
                    "CPU instead (slower).", requested, torch.__version__)
        return torch.device("cpu")
    return torch.device(requested)


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def default_threads() -> int:
    """Every available CPU, as ``nnUNetv2_predict -device cpu`` uses.

    On an idle 2-core machine two threads ran the default-size network 1.7× faster than
    one (benchmarks/README.md). When other work keeps the cores busy, torch's idle threads
    spin while they wait and fewer threads are faster: pass ``num_threads`` (CLI
    ``--threads``) then.
    """
    return available_cpus()


@contextlib.contextmanager
def _torch_threads(n: int):
    """Use n intra-op threads for the duration, then restore the caller's setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def _nnunet_output_to_log():
    """nnU-Net prints status lines; the library logs instead of printing."""
    captured = io.StringIO()
    with contextlib.redirect_stdout(captured):
        yield
    for line in captured.getvalue().splitlines():
        if line.strip():
            log.debug("nnU-Net: %s", line.strip())


# ---------------------------------------------------------------- segmenting


@dataclass(frozen=True, eq=False)
class SegmentationResult:
    """Labels (our class values) for one canonical slice, with per-fold detail and QC."""

    labels: np.ndarray  # uint8 [rows, cols]
    probabilities: np.ndarray  # float32 [4, rows, cols]: mean softmax, order of LABEL_VALUES
    fold_labels: tuple[np.ndarray, ...]  # uint8 [rows, cols] per fold, our class values
    folds: tuple[int, ...]
    qc: QCScore
    timings: dict[str, float]  # seconds: load (once, at construction), preprocess, fold_k,
    #                           ensemble, total (this call, load excluded)
    device: str
    tta: bool


class Segmenter:
    """An nnU-Net v2 2d model loaded once; ``predict`` segments canonical axial slices.

    The per-fold weights stay in memory (on the CPU) between calls; each fold's are loaded
    into the one network in turn, as ``nnUNetPredictor`` does. Calls are serialised, so one
    Segmenter may be shared between threads.

    ``device``: "auto" (CUDA, else MPS, else CPU), "cpu", "cuda" or "mps"; an unavailable
    accelerator falls back to the CPU with a warning, and ``device`` records what is used.
    ``num_threads``: torch's intra-op threads while predicting, restored afterwards
    (default: :func:`default_threads`, every available CPU).
    """

    def __init__(self, model_dir: str | Path, folds: str | Sequence[int] = "all",
                 device: str = "auto", tta: bool = True, checkpoint: str = DEFAULT_CHECKPOINT,
                 label_mapping: Mapping[int, int] | None = None, num_threads: int | None = None):
        start = perf_counter()
        self.info = validate_model_folder(model_dir, checkpoint, label_mapping, folds)
        self.device = resolve_device(device)
        self.tta = bool(tta)
        self.num_threads = int(num_threads or default_threads())
        self._predictor = self._load_predictor()
        self._lookup = _lookup_table(self.info.label_mapping)
        self._lock = threading.Lock()
        self.load_seconds = perf_counter() - start
        log.info("Loaded %s (%s) on %s in %.1f s.", self.info.path, self.info.summary,
                 self.device, self.load_seconds)

    @property
    def folds(self) -> tuple[int, ...]:
        return self.info.folds

    def provenance(self) -> dict:
        """JSON-ready description of the model and settings, for reports."""
        info = self.info
        return {
            "model_dir": str(info.path),
            "model_name": info.card.get("name"),
            "model_version": info.card.get("version"),
            "model_label": info.card_label,
            "dataset_name": info.dataset_name,
            "configuration": info.configuration,
            "trainer": info.trainer,
            "plans": info.plans,
            "checkpoint": info.checkpoint,
            "folds": list(info.folds),
            "label_mapping": {str(k): v for k, v in info.label_mapping.items()},
            "ensemble": "mean of per-fold softmax probabilities",
            "tta": self.tta,
            "device": str(self.device),
        }

    def _load_predictor(self):
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

        with _nnunet_output_to_log(), _torch_threads(self.num_threads):
            predictor = nnUNetPredictor(
                tile_step_size=0.5, use_gaussian=True, use_mirroring=self.tta,
                perform_everything_on_device=self.device.type == "cuda", device=self.device,
                verbose=False, verbose_preprocessing=False, allow_tqdm=False)
            predictor.initialize_from_trained_model_folder(
                str(self.info.path), use_folds=self.info.folds,
                checkpoint_name=self.info.checkpoint)
        return predictor

    def predict(self, slice_: AxialSlice, progress: Progress | None = None,
                cancel: CancelFlag | None = None) -> SegmentationResult:
        """Segment one canonical slice (rows A→P, columns R→L) with the fold ensemble.

        ``progress(done, total, message)`` is called before each fold ("fold 2/5") and at
        the end; ``cancel.is_set()`` is checked between folds and raises CancelledError.
        """
        pixels = _check_pixels(slice_)
        n = len(self.folds)
        with self._lock, _torch_threads(self.num_threads), torch.inference_mode():
            start = perf_counter()
            timings = {"load": self.load_seconds}
            data, properties = self._preprocess(pixels, slice_)
            timings["preprocess"] = perf_counter() - start
            fold_probabilities, fold_segmentations = [], []
            weights = self._predictor.list_of_parameters
            for i, (fold, fold_weights) in enumerate(zip(self.folds, weights, strict=True)):
                if cancel is not None and cancel.is_set():
                    raise CancelledError(f"Segmentation cancelled before fold {i + 1}/{n}.")
                if progress is not None:
                    progress(i, n, f"fold {i + 1}/{n}")
                fold_start = perf_counter()
                probabilities, segmentation = self._predict_fold(fold_weights, data, properties)
                fold_probabilities.append(probabilities)
                fold_segmentations.append(segmentation)
                timings[f"fold_{fold}"] = perf_counter() - fold_start
            ensemble_start = perf_counter()
            labels, probabilities, fold_labels = self._ensemble(fold_probabilities,
                                                                fold_segmentations)
            timings["ensemble"] = perf_counter() - ensemble_start
            timings["total"] = perf_counter() - start
        if progress is not None:
            progress(n, n, "done")
        return SegmentationResult(
            labels=labels, probabilities=probabilities, fold_labels=fold_labels,
            folds=self.folds, qc=fold_agreement(fold_labels), timings=timings,
            device=str(self.device), tta=self.tta)

    def _preprocess(self, pixels: np.ndarray, slice_: AxialSlice):
        """nnU-Net's preprocessing of the slice, as SimpleITKIO reads a 2D image."""
        p = self._predictor
        row_mm, col_mm = (float(s) for s in slice_.spacing_mm)
        properties = {"spacing": [_OUT_OF_PLANE_FACTOR * max(row_mm, col_mm), row_mm, col_mm]}
        preprocessor = p.configuration_manager.preprocessor_class(verbose=False)
        data, _, properties = preprocessor.run_case_npy(
            pixels[None, None], None, properties, p.plans_manager, p.configuration_manager,
            p.dataset_json)
        return torch.from_numpy(data).to(dtype=torch.float32).contiguous(), properties

    def _predict_fold(self, weights: dict, data: torch.Tensor, properties: dict):
        """One fold: logits (with TTA), then softmax and resampling by nnU-Net's export code."""
        from nnunetv2.inference.export_prediction import (
            convert_predicted_logits_to_segmentation_with_correct_shape,
        )

        p = self._predictor
        getattr(p.network, "_orig_mod", p.network).load_state_dict(weights)
        logits = p.predict_sliding_window_return_logits(data).to("cpu")
        segmentation, probabilities = convert_predicted_logits_to_segmentation_with_correct_shape(
            logits, p.plans_manager, p.configuration_manager, p.label_manager, properties,
            return_probabilities=True, num_threads_torch=self.num_threads)
        return np.asarray(probabilities, dtype=np.float32)[:, 0], np.asarray(segmentation)[0]

    def _ensemble(self, fold_probabilities, fold_segmentations):
        """Mean of the folds' softmax probabilities; labels are its argmax, mapped to ours."""
        mean = np.mean(fold_probabilities, axis=0, dtype=np.float32)
        labels = self._lookup[np.argmax(mean, axis=0)]
        ours = np.zeros((len(LABEL_VALUES), *mean.shape[1:]), np.float32)
        for nnunet_id, value in self.info.label_mapping.items():
            ours[LABEL_VALUES.index(value)] += mean[nnunet_id]
        fold_labels = tuple(self._lookup[s] for s in fold_segmentations)
        return labels, ours, fold_labels


def _lookup_table(mapping: Mapping[int, int]) -> np.ndarray:
    table = np.zeros(max(mapping) + 1, np.uint8)
    for nnunet_id, value in mapping.items():
        table[nnunet_id] = value
    return table


def _check_pixels(slice_: AxialSlice) -> np.ndarray:
    pixels = np.asarray(slice_.pixels, dtype=np.float32)
    if pixels.ndim != 2 or min(pixels.shape) < 1:
        raise InputError(f"A slice needs 2D pixels [rows, cols]; got shape {pixels.shape}.")
    if not np.all(np.isfinite(pixels)):
        raise InputError(
            f"The slice has {int(np.sum(~np.isfinite(pixels)))} NaN or infinite pixels. "
            "Replace them (e.g. with -1024 HU, air) before segmenting."
        )
    return pixels
