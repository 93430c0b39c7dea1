"""Small real nnU-Net v2 model folders for tests, planned and checkpointed by nnU-Net's code.

``build_tiny_model`` writes a synthetic 2D dataset (64 × 64 slices, 4 mm pixels) in
nnU-Net's raw layout, lets nnU-Net extract the fingerprint and plan it (its own
``DatasetFingerprintExtractor`` and ``ExperimentPlanner``, with the feature counts cut
to 8…32 so the network is tiny), builds the network with ``nnUNetTrainer``'s own
``build_network_architecture``, trains each fold briefly on nnU-Net-preprocessed arrays
(``DefaultPreprocessor.run_case_npy``) and saves checkpoints with the keys
``nnUNetTrainer.save_checkpoint`` writes. The result is a model folder in nnU-Net's results
layout that ``nnUNetv2_predict`` and ``nnUNetPredictor`` load as they would any other.

The brief training replaces nnU-Net's 1000-epoch schedule (minutes per fold on a CPU) with
a plain Adam loop: enough for confident, fold-consistent predictions on the easy synthetic
anatomy, which is what comparisons of ensembling paths need.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

DATASET_ID = 901
DATASET_NAME = "Dataset901_TinyL3"
MODEL_SUBDIR = "nnUNetTrainer__nnUNetPlans__2d"
LABELS = {"background": 0, "psoas": 1, "paraspinal": 2, "abdominal_wall": 3}
SIZE = 64
SPACING_MM = 4.0  # in-plane
SLICE_MM = 5.0  # slice thickness written into the one-slice NIfTIs


# ---------------------------------------------------------------- synthetic anatomy


def tiny_case(seed: int, size: int = SIZE) -> tuple[np.ndarray, np.ndarray]:
    """A crude axial slice (HU) and labels: body, wall band, vertebra, psoas, paraspinals.

    The three muscles get distinct HU (100, 180, 260) so a tiny network learns them in a
    few dozen steps; 3 % of muscle pixels are fat (intramuscular fat), which keeps nnU-Net's
    CT normalisation (clipped to the 0.5–99.5 % foreground percentiles) from merging fat
    with the darkest muscle.
    """
    rng = np.random.default_rng(seed)
    k = size / SIZE  # lengths below are in pixels of a SIZE-pixel slice
    rows, cols = np.mgrid[0:size, 0:size].astype(float)
    centre = size / 2 + rng.uniform(-2, 2, 2) * k
    half = np.array([0.34, 0.42]) * size * rng.uniform(0.9, 1.05, 2)  # (AP, LR)
    radius = np.hypot((rows - centre[0]) / half[0], (cols - centre[1]) / half[1])
    image = np.full((size, size), -1000.0)
    labels = np.zeros((size, size), np.uint8)
    image[radius <= 1] = -100.0
    wall = (radius <= 0.9) & (radius > 0.9 - 3.0 * k / half.min()) & (
        rows < centre[0] + 0.3 * half[0])
    _paint(image, labels, wall, 260.0, LABELS["abdominal_wall"])
    spine = centre + np.array([0.45 * half[0], 0.0])
    _paint(image, labels, _disc(rows, cols, spine, 4.0 * k), 600.0, 0)
    for side in (-1, 1):
        psoas = spine + (np.array([-1.0, side * 8.0]) + rng.uniform(-1, 1, 2)) * k
        _paint(image, labels, _disc(rows, cols, psoas, rng.uniform(3.0, 4.0) * k), 100.0,
               LABELS["psoas"])
        back = spine + (np.array([7.0, side * 5.0]) + rng.uniform(-1, 1, 2)) * k
        _paint(image, labels, _disc(rows, cols, back, rng.uniform(3.5, 4.5) * k), 180.0,
               LABELS["paraspinal"])
    image[(labels > 0) & (rng.random(image.shape) < 0.03)] = -80.0
    image += rng.normal(0.0, 12.0, image.shape)
    return image.astype(np.float32), labels


def _disc(rows, cols, centre, r) -> np.ndarray:
    return np.hypot(rows - centre[0], cols - centre[1]) <= r


def _paint(image, labels, mask, hu, label) -> None:
    image[mask] = hu
    labels[mask] = label


def write_one_slice_nifti(array: np.ndarray, path: Path, spacing_rc=(SPACING_MM, SPACING_MM),
                          slice_mm: float = SLICE_MM) -> None:
    """A [rows, cols] array as a one-slice LPS NIfTI: rows → +y (posterior), cols → +x."""
    image = sitk.GetImageFromArray(array[None])
    image.SetSpacing((float(spacing_rc[1]), float(spacing_rc[0]), float(slice_mm)))
    sitk.WriteImage(image, str(path))


# ---------------------------------------------------------------- nnU-Net dataset and plans


def write_raw_dataset(raw_root: Path, n_cases: int, seed: int = 0) -> Path:
    folder = raw_root / DATASET_NAME
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    for i in range(n_cases):
        image, labels = tiny_case(seed * 1000 + i)
        write_one_slice_nifti(image, folder / "imagesTr" / f"tiny_{i:03d}_0000.nii.gz")
        write_one_slice_nifti(labels, folder / "labelsTr" / f"tiny_{i:03d}.nii.gz")
    dataset = {"channel_names": {"0": "CT"}, "labels": LABELS, "numTraining": n_cases,
               "file_ending": ".nii.gz", "name": DATASET_NAME}
    (folder / "dataset.json").write_text(json.dumps(dataset, indent=2))
    return folder


def plan_tiny(raw_root: Path, preprocessed_root: Path) -> dict:
    """nnU-Net's fingerprint and 2D plan, with 8 base features (max 32) instead of 32/512."""
    from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import (
        DatasetFingerprintExtractor,
    )
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import (
        ExperimentPlanner,
    )

    with pytest.MonkeyPatch.context() as patch:  # nnU-Net reads its folders from os.environ
        patch.setenv("nnUNet_raw", str(raw_root))
        patch.setenv("nnUNet_preprocessed", str(preprocessed_root))
        extractor = DatasetFingerprintExtractor(DATASET_ID, num_processes=1)
        extractor.show_progress_bar = False
        extractor.run()
        planner = ExperimentPlanner(DATASET_ID)
        planner.UNet_base_num_features = 8
        planner.UNet_max_features_2d = 32
        planner.plan_experiment()
    return json.loads((preprocessed_root / DATASET_NAME / "nnUNetPlans.json").read_text())


# ---------------------------------------------------------------- brief training


def preprocess_case(image: np.ndarray, labels: np.ndarray, plans: dict, dataset: dict):
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    manager = PlansManager(plans)
    properties = {"spacing": [SLICE_MM, SPACING_MM, SPACING_MM]}
    data, seg, _ = DefaultPreprocessor(verbose=False).run_case_npy(
        image[None, None], labels[None, None].astype(np.int16), properties, manager,
        manager.get_configuration("2d"), dataset)
    return data[:, 0], seg[0, 0].astype(np.int64)


def build_network(plans: dict):
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    manager = PlansManager(plans)
    return nnUNetTrainer.build_network_architecture(
        manager, manager.get_configuration("2d"), 1, len(LABELS), enable_deep_supervision=False)


def train_fold(plans: dict, images: torch.Tensor, targets: torch.Tensor, seed: int,
               steps: int, min_dice: float | None = None) -> dict:
    """Brief training. With ``min_dice``, a run whose worst class Dice on its own training
    cases falls below it (rare: a class that never appears) restarts with another seed."""
    for attempt in range(4):
        network = _train(plans, images, targets, seed + 100 * attempt, steps)
        if min_dice is None or _worst_class_dice(network, images, targets) >= min_dice:
            return {k: v.detach().clone() for k, v in network.state_dict().items()}
    raise RuntimeError(f"The tiny test network did not learn all classes (seed {seed}).")


def _train(plans: dict, images: torch.Tensor, targets: torch.Tensor, seed: int, steps: int):
    """Adam with nnU-Net's poly learning rate and Dice + CE loss, with random mirroring."""
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
    from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler

    torch.manual_seed(seed)
    network = build_network(plans)
    loss_fn = DC_and_CE_loss({"batch_dice": True, "smooth": 1e-5, "do_bg": False, "ddp": False},
                             {}, dice_class=MemoryEfficientSoftDiceLoss)
    optimiser = torch.optim.Adam(network.parameters(), lr=2e-2)
    schedule = PolyLRScheduler(optimiser, 2e-2, steps)
    generator = torch.Generator().manual_seed(seed)
    network.train()
    for _ in range(steps):
        batch = torch.randperm(len(images), generator=generator)[:8]
        x, y = images[batch], targets[batch]
        for axis in (-2, -1):  # nnU-Net mirrors along every axis it allows at inference
            if torch.rand(1, generator=generator) < 0.5:
                x, y = x.flip(axis), y.flip(axis)
        loss = loss_fn(network(x), y[:, None])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()
    return network.eval()


def _worst_class_dice(network, images: torch.Tensor, targets: torch.Tensor) -> float:
    with torch.no_grad():
        predicted = network(images).argmax(1)
    scores = []
    for value in range(1, len(LABELS)):
        a, b = predicted == value, targets == value
        scores.append(float(2 * (a & b).sum() / (a.sum() + b.sum())))
    return min(scores)


def save_checkpoint(path: Path, weights: dict, plans: dict, dataset: dict, fold: int,
                    configuration: str = "2d") -> None:
    """The keys nnUNetTrainer.save_checkpoint writes (optimizer state and logs omitted)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({
        "network_weights": weights,
        "init_args": {"plans": plans, "configuration": configuration, "fold": fold,
                      "dataset_json": dataset, "device": torch.device("cpu")},
        "trainer_name": "nnUNetTrainer",
        "inference_allowed_mirroring_axes": (0, 1),
        "current_epoch": 1,
    }, path)


def build_tiny_model(root: Path, n_folds: int = 3, n_cases: int = 10, steps: int = 120,
                     seed: int = 0, min_dice: float | None = None) -> Path:
    """An nnU-Net results folder; returns the model folder (…__2d).

    ``min_dice`` (e.g. 0.9) makes every fold fit its training cases at least that well;
    leave it None for a quick, barely trained model when only the plumbing matters.
    """
    raw = write_raw_dataset(root / "raw", n_cases, seed)
    plans = plan_tiny(root / "raw", root / "preprocessed")
    dataset = json.loads((raw / "dataset.json").read_text())
    cases = [preprocess_case(*tiny_case(seed * 1000 + i), plans, dataset) for i in range(n_cases)]
    images = torch.from_numpy(np.stack([c[0] for c in cases]))
    targets = torch.from_numpy(np.stack([c[1] for c in cases]))
    model = root / "results" / DATASET_NAME / MODEL_SUBDIR
    model.mkdir(parents=True)
    (model / "dataset.json").write_text(json.dumps(dataset, indent=2))
    (model / "plans.json").write_text(json.dumps(plans, indent=2))
    shutil.copy(root / "preprocessed" / DATASET_NAME / "dataset_fingerprint.json", model)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # faster than 2 on a small net, and kinder to a shared machine
    try:
        for fold in range(n_folds):
            train = np.arange(n_cases) % n_folds != fold  # cross-validation split
            weights = train_fold(plans, images[train], targets[train], seed + fold, steps,
                                 min_dice)
            save_checkpoint(model / f"fold_{fold}" / "checkpoint_final.pth", weights, plans,
                            dataset, fold)
    finally:
        torch.set_num_threads(threads)
    return model


def cached_tiny_model(cache_root: Path) -> Path:
    """A well-fitted ``build_tiny_model``, built once per version of this file, nnU-Net and
    torch (older versions are removed)."""
    key = hashlib.sha256(Path(__file__).read_bytes()
                         + f"{version('nnunetv2')} {torch.__version__}".encode()).hexdigest()[:16]
    done = cache_root / f"model-{key}"
    if not done.is_dir():
        for stale in cache_root.glob("model-*"):
            shutil.rmtree(stale, ignore_errors=True)  # models of older fixture versions
        cache_root.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(dir=cache_root, prefix="building-"))
        try:
            build_tiny_model(work, min_dice=0.9)
            work.rename(done)  # atomic: a half-built model is never found
        finally:  # after a failure, or when another session finished first
            shutil.rmtree(work, ignore_errors=True)
    return done / "results" / DATASET_NAME / MODEL_SUBDIR
