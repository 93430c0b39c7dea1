"""Train the bundled demo model on synthetic L3 phantoms and install it into the package.

    .venv/bin/python scripts/train_demo_model.py [--work DIR] [--folds 0 1 2 3 4] ...

Steps (each skipped when its output already exists, so an interrupted run resumes):

1. phantom pairs ``<case>-image.nii.gz`` / ``<case>-label.nii.gz`` from the training seeds,
   half 256 × 256 (1.4–1.8 mm pixels) and half 512 × 512 (0.6–1.0 mm), some with ascites;
2. ``l3muscleseg dataset build`` (library call) into an nnU-Net raw folder;
3. nnU-Net's own fingerprint and plan, then a smaller 2d network in the plans (fewer
   features, 2 mm pixels, smaller patch) so that the whole run fits 30 minutes on 2 CPU
   cores (16 min measured on an idle machine), then nnU-Net's 2d preprocessing;
4. a warm-up run of nnU-Net's standard trainer on a second phantom set (other seeds, same
   plans, as ``nnUNetv2_move_plans_between_datasets`` would copy them), then each
   cross-validation fold started from all of its weights and fine-tuned with a short
   schedule at a 10× smaller learning rate. A network trained from scratch needs ~700
   iterations before all three muscles appear; the warm-up pays that once instead of five
   times, and since it never saw the cross-validation cases the folds' validation Dice
   stays honest. (nnU-Net's own ``-pretrained_weights`` re-initialises the segmentation
   layers; fine-tuned that way for 200 iterations, 3 of 5 folds lost the psoas at the
   default learning rate and 0.001 was too slow to relearn them.);
5. the folds' checkpoints stripped to what inference needs, evaluated as a softmax-averaged
   ensemble on held-out phantoms (seeds never used in training), checked to load with
   ``nnUNetPredictor`` and ``nnUNetv2_predict``, and installed with a model card into
   ``L3MuscleSegLib/data/demo_model/``.

The demo model is for demonstrations and tests only: not for clinical use.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from L3MuscleSegLib import dataset, training
from L3MuscleSegLib.geometry import Geometry
from L3MuscleSegLib.inference import validate_model_folder
from L3MuscleSegLib.labels import MUSCLE_CLASSES, NNUNET_LABELS
from L3MuscleSegLib.phantom import make_phantom_slice

REPO = Path(__file__).resolve().parents[1]
DEMO_MODEL = REPO / "L3MuscleSegLib" / "data" / "demo_model"
DATASET_ID, DATASET_NAME = 711, "L3Phantom"  # the cross-validated folds
PRETRAIN_ID, PRETRAIN_NAME = 712, "L3PhantomPretrain"  # one warm-up run on other seeds
PRETRAIN_SEED_BASE = 500_000  # cross-validation seeds are 0..N-1
HELDOUT_SEED_BASE = 1_000_000  # never trained on
SLICE_MM = 3.0
MAX_MODEL_MB = 25
# Checkpoint keys nnUNetPredictor.initialize_from_trained_model_folder reads.
CHECKPOINT_KEYS = ("network_weights", "init_args", "trainer_name",
                   "inference_allowed_mirroring_axes", "current_epoch")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "l3-demo-training")
    p.add_argument("--train-cases", type=int, default=150, help="cross-validation cases")
    p.add_argument("--pretrain-cases", type=int, default=150,
                   help="cases of the warm-up dataset (0: no warm-up)")
    p.add_argument("--pretrain-epochs", type=int, default=36)
    p.add_argument("--heldout-cases", type=int, default=20)
    p.add_argument("--folds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--epochs", type=int, default=8, help="epochs per fold")
    p.add_argument("--fold-lr", type=float, default=1e-3,
                   help="initial learning rate of the folds started from the warm-up weights")
    p.add_argument("--iterations", type=int, default=25, help="training batches per epoch")
    p.add_argument("--val-iterations", type=int, default=4)
    p.add_argument("--features", type=int, nargs="+", default=[8, 16, 32, 64, 128, 128],
                   help="features per encoder stage (sets the number of stages)")
    p.add_argument("--patch", type=int, default=160)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--spacing", type=float, default=2.0,
                   help="in-plane training spacing in mm (0: nnU-Net's plan)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--min-dice", type=float, default=0.90)
    p.add_argument("--install", type=Path, default=DEMO_MODEL)
    p.add_argument("--no-install", action="store_true", help="evaluate only")
    return p.parse_args()


def main() -> int:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    timings: dict[str, float] = {}
    args.work.mkdir(parents=True, exist_ok=True)
    with timer(timings, "phantoms + datasets"):
        folders = make_dataset(args.work, DATASET_ID, DATASET_NAME, range(args.train_cases))
        pretrain = make_dataset(
            args.work, PRETRAIN_ID, PRETRAIN_NAME,
            range(PRETRAIN_SEED_BASE, PRETRAIN_SEED_BASE + args.pretrain_cases),
        ) if args.pretrain_cases else None
    with timer(timings, "plan + preprocess"):
        if not training.is_preprocessed(folders):
            training.plan(folders, processes=args.threads)
            shrink_plans(folders.plans_file, args)
            training.preprocess(folders, processes=args.threads)
        if pretrain and not training.is_preprocessed(pretrain):
            training.plan(pretrain, processes=args.threads)  # its own fingerprint
            copy_plans(folders, pretrain)
            training.preprocess(pretrain, processes=args.threads)
    schedule = {"device": "cpu", "iterations_per_epoch": args.iterations,
                "val_iterations_per_epoch": args.val_iterations, "threads": args.threads}
    warm_start = None
    if pretrain:
        with timer(timings, "warm-up training"):
            warm_start = training.train_fold(pretrain, 0, epochs=args.pretrain_epochs,
                                             **schedule)
    with timer(timings, "fold training"):
        for fold in args.folds:
            with timer(timings, f"fold {fold}"):
                training.train_fold(folders, fold, epochs=args.epochs,
                                    init_weights=warm_start,
                                    initial_lr=args.fold_lr if warm_start else None,
                                    **schedule)
        summary = training.write_training_summary(folders.model_folder, args.folds)
    print(Path(summary.csv).read_text())
    staging = args.work / "demo_model"
    with timer(timings, "export + held-out evaluation"):
        export_model(folders, args.folds, staging)
        print(validate_model_folder(staging))  # the product's own model-folder check
        heldout = evaluate_heldout(staging, args.folds, args.heldout_cases)
        check_nnunet_predict(staging, args.work)
    print(json.dumps(heldout, indent=2))
    cpu_minutes = cpu_time_of_children() / 60
    timings_rounded = {k: round(v, 1) for k, v in timings.items()}
    write_model_card(staging, args, heldout, summary, timings_rounded, cpu_minutes)
    mean_dice = heldout["ensemble"]["mean_foreground"]
    print("Timings (s):", json.dumps(timings_rounded, indent=2))
    print(f"CPU time of all child processes: {cpu_minutes:.1f} core-minutes")
    if mean_dice < args.min_dice:
        print(f"Held-out mean foreground Dice {mean_dice:.3f} < {args.min_dice}: not installed.")
        return 1
    if not args.no_install:
        install(staging, args.install)
    return 0


def make_dataset(work: Path, dataset_id: int, name: str, seeds) -> training.NnunetFolders:
    raw_dataset = work / "nnUNet_raw" / dataset.dataset_folder_name(dataset_id, name)
    if not raw_dataset.is_dir():
        pairs = write_pairs(work / f"pairs_{dataset_id}", seeds)
        report = dataset.build_dataset([pairs], dataset_id, name, raw_dataset.parent)
        print(report.format())
        if not report.ok:
            raise SystemExit(1)
    return training.NnunetFolders.for_dataset(raw_dataset)


def copy_plans(source: training.NnunetFolders, target: training.NnunetFolders) -> None:
    """The same plans (network, spacing, CT normalisation) for the warm-up dataset, as
    ``nnUNetv2_move_plans_between_datasets`` does."""
    plans = json.loads(source.plans_file.read_text())
    plans["dataset_name"] = target.dataset_name
    target.plans_file.write_text(json.dumps(plans, indent=2))


def cpu_time_of_children() -> float:
    """CPU seconds (user + system) used by finished child processes and their children."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# ---------------------------------------------------------------- data


def phantom_case(seed: int) -> tuple[str, object]:
    """Even seeds 256 × 256, odd seeds 512 × 512; every seventh with ascites."""
    size = 512 if seed % 2 else 256
    return f"phantom{seed:07d}", make_phantom_slice(seed, size=size, ascites=seed % 7 == 3)


def write_pairs(folder: Path, seeds) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for seed in seeds:
        case_id, phantom = phantom_case(seed)
        if (folder / f"{case_id}-label.nii.gz").is_file():
            continue
        geometry = slice_geometry(phantom)
        for suffix, array in (("image", phantom.image.astype(np.int16)),
                              ("label", phantom.labels)):
            image = geometry.apply_to(sitk.GetImageFromArray(array[None]))
            sitk.WriteImage(image, str(folder / f"{case_id}-{suffix}.nii.gz"), useCompression=True)
    return folder


def slice_geometry(phantom) -> Geometry:
    row, col = phantom.spacing_mm
    rows, cols = phantom.image.shape
    origin = (-col * (cols - 1) / 2, -row * (rows - 1) / 2, -300.0)
    return Geometry((col, row, SLICE_MM), origin, tuple(float(v) for v in np.eye(3).ravel()))


# ---------------------------------------------------------------- plans


def shrink_plans(plans_file: Path, args) -> None:
    """A small 2d U-Net: given features per stage, matching strides/kernels, smaller patch."""
    plans = json.loads(plans_file.read_text())
    config = plans["configurations"]["2d"]
    n = len(args.features)
    arch = config["architecture"]["arch_kwargs"]
    arch.update(
        n_stages=n, features_per_stage=list(args.features),
        kernel_sizes=[[3, 3]] * n, strides=[[1, 1]] + [[2, 2]] * (n - 1),
        n_conv_per_stage=[2] * n, n_conv_per_stage_decoder=[2] * (n - 1),
    )
    config["patch_size"] = [args.patch, args.patch]
    config["batch_size"] = args.batch
    if args.spacing:
        config["spacing"] = [args.spacing, args.spacing]
    plans_file.write_text(json.dumps(plans, indent=2))


# ---------------------------------------------------------------- export and evaluation


def export_model(folders: training.NnunetFolders, folds, staging: Path) -> None:
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    for name in ("dataset.json", "plans.json"):
        shutil.copy2(folders.model_folder / name, staging / name)
    for fold in folds:
        source = folders.model_folder / f"fold_{fold}"
        (staging / f"fold_{fold}" / "validation").mkdir(parents=True)
        checkpoint = torch.load(source / "checkpoint_final.pth", map_location="cpu",
                                weights_only=False)
        slim = {k: checkpoint[k] for k in CHECKPOINT_KEYS if k in checkpoint}
        slim["network_weights"] = half_precision(slim["network_weights"])
        torch.save(slim, staging / f"fold_{fold}" / "checkpoint_final.pth")
        shutil.copy2(source / "validation" / "summary.json",
                     staging / f"fold_{fold}" / "validation" / "summary.json")
        shutil.copy2(source / "progress.png", staging / f"fold_{fold}" / "progress.png")
    size_mb = sum(f.stat().st_size for f in staging.rglob("*") if f.is_file()) / 2**20
    print(f"Exported model: {size_mb:.1f} MB")
    if size_mb > MAX_MODEL_MB:
        raise SystemExit(f"Model is {size_mb:.1f} MB, over the {MAX_MODEL_MB} MB budget.")


def half_precision(weights: dict) -> dict:
    """float16 copies of float tensors; tensors that shared storage keep sharing it."""
    converted, out = {}, {}
    for key, tensor in weights.items():
        ident = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(),
                 tuple(tensor.shape), tuple(tensor.stride()))
        if ident not in converted:
            converted[ident] = tensor.half() if tensor.is_floating_point() else tensor
        out[key] = converted[ident]
    return out


def evaluate_heldout(model: Path, folds, n_cases: int) -> dict:
    """Dice per class of each fold and of the softmax-averaged ensemble on unseen seeds."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    predictors = []
    for fold in folds:
        predictor = nnUNetPredictor(device=torch.device("cpu"), allow_tqdm=False)
        predictor.initialize_from_trained_model_folder(str(model), use_folds=(fold,))
        predictors.append(predictor)
    seeds = [HELDOUT_SEED_BASE + k for k in range(n_cases)]
    per_fold = {fold: [] for fold in folds}
    ensemble = []
    for seed in seeds:
        case_id, phantom = phantom_case(seed)
        row, col = phantom.spacing_mm
        properties = {"spacing": [SLICE_MM, row, col]}
        image = phantom.image[None, None].astype(np.float32)
        probabilities = []
        for fold, predictor in zip(folds, predictors, strict=True):
            _, probs = predictor.predict_single_npy_array(image, properties, None, None, True)
            probabilities.append(probs)
            per_fold[fold].append(dice(np.argmax(probs, 0)[0], phantom.labels))
        ensemble.append(dice(np.argmax(np.mean(probabilities, 0), 0)[0], phantom.labels))
        print(f"held-out {case_id} ({phantom.image.shape[0]} px, {row:.2f} mm): "
              f"ensemble Dice {ensemble[-1]}")
    return {"seeds": seeds, "ensemble": mean_dice(ensemble),
            "folds": {str(f): mean_dice(v) for f, v in per_fold.items()}}


def dice(prediction: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    out = {}
    for cls in MUSCLE_CLASSES:
        p, t = prediction == cls.value, truth == cls.value
        out[cls.key] = float(2 * np.count_nonzero(p & t) / (p.sum() + t.sum()))
    return out


def mean_dice(cases: list[dict[str, float]]) -> dict[str, float]:
    means = {cls.key: float(np.mean([c[cls.key] for c in cases])) for cls in MUSCLE_CLASSES}
    means["mean_foreground"] = float(np.mean(list(means.values())))
    return means


def check_nnunet_predict(model: Path, work: Path) -> None:
    """nnU-Net's own command line must load the stripped model folder too."""
    folder = work / "predict_check"
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "in").mkdir(parents=True)
    case_id, phantom = phantom_case(HELDOUT_SEED_BASE + 999)
    image = slice_geometry(phantom).apply_to(sitk.GetImageFromArray(phantom.image[None]))
    sitk.WriteImage(image, str(folder / "in" / "check_0000.nii.gz"))
    command = [str(Path(sys.executable).with_name("nnUNetv2_predict_from_modelfolder")),
               "-i", str(folder / "in"), "-o", str(folder / "out"), "-m", str(model),
               "-f", "0", "-device", "cpu", "--disable_progress_bar"]
    subprocess.run(command, check=True, capture_output=True, text=True)
    predicted = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "out" / "check.nii.gz")))[0]
    print(f"nnUNetv2_predict_from_modelfolder OK, Dice {dice(predicted, phantom.labels)}")


def write_model_card(staging: Path, args, heldout: dict, summary, timings: dict,
                     cpu_minutes: float) -> None:
    card = {
        "name": "L3 phantom demo",
        "version": "1",
        "label": "demo, not for clinical use",
        "description": "2D nnU-Net v2 (nnUNetTrainer, small network) trained on synthetic L3 "
                       "phantoms from L3MuscleSegLib.phantom. Demonstrations and tests only.",
        "labels": NNUNET_LABELS,
        "configuration": "2d",
        "folds": list(args.folds),
        "training_seeds": [0, args.train_cases - 1],
        "warm_up_seeds": ([PRETRAIN_SEED_BASE, PRETRAIN_SEED_BASE + args.pretrain_cases - 1]
                          if args.pretrain_cases else None),
        "heldout_seeds": [heldout["seeds"][0], heldout["seeds"][-1]],
        "heldout_dice": heldout["ensemble"],
        "heldout_dice_per_fold": heldout["folds"],
        "crossval_dice_per_fold": {str(f.fold): f.dice for f in summary.folds},
        "schedule": {"warm_up_epochs": args.pretrain_epochs if args.pretrain_cases else 0,
                     "epochs": args.epochs, "fold_initial_lr": args.fold_lr,
                     "iterations_per_epoch": args.iterations,
                     "features_per_stage": args.features, "patch_size": args.patch,
                     "batch_size": args.batch, "spacing_mm": args.spacing},
        "training_time_s": timings,
        "training_cpu_core_minutes": round(cpu_minutes, 1),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "nnunetv2_version": metadata.version("nnunetv2"),
        "torch_version": torch.__version__,
    }
    (staging / "l3muscleseg_model.json").write_text(json.dumps(card, indent=2) + "\n")
    (staging / "README.txt").write_text(
        "L3 phantom demo model: demo, not for clinical use.\n\n"
        "A 2D nnU-Net v2 ensemble trained only on synthetic L3 phantoms "
        "(L3MuscleSegLib/phantom.py)\nby scripts/train_demo_model.py. It shows how the tools "
        "work; it has never seen a real CT.\n"
        f"Held-out phantom Dice (ensemble): {json.dumps(heldout['ensemble'])}\n")


def install(staging: Path, destination: Path) -> None:
    """Replace the installed demo model in one rename (old copy removed afterwards)."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    incoming = destination.with_name(f".{destination.name}.incoming")
    shutil.rmtree(incoming, ignore_errors=True)
    shutil.copytree(staging, incoming,
                    ignore=shutil.ignore_patterns("validation_raw", "*.npz", "*.pkl"))
    retired = destination.with_name(f".{destination.name}.old")
    if destination.exists():
        shutil.rmtree(retired, ignore_errors=True)
        destination.rename(retired)
    incoming.rename(destination)
    shutil.rmtree(retired, ignore_errors=True)
    print(f"Installed {destination}")


# ---------------------------------------------------------------- helpers


class timer:
    def __init__(self, timings: dict, name: str):
        self.timings, self.name = timings, name

    def __enter__(self):
        self.start = time.perf_counter()

    def __exit__(self, *exc):
        self.timings[self.name] = time.perf_counter() - self.start
        print(f"[{self.name}] {self.timings[self.name]:.1f} s", flush=True)


if __name__ == "__main__":
    sys.exit(main())
