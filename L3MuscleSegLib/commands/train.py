"""`l3muscleseg train`: nnU-Net planning and 2D training of the cross-validation folds."""

from __future__ import annotations

import argparse
from pathlib import Path

from .. import training

NAME = "train"
HELP = "Plan and train the 2D nnU-Net folds on a dataset built by `l3muscleseg dataset build`."

EXIT_OK = 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dataset_dir", type=Path, metavar="DATASET_DIR",
                        help="nnU-Net raw dataset folder, e.g. nnUNet_raw/Dataset711_L3SM")
    parser.add_argument("--folds", type=int, nargs="+", default=list(training.DEFAULT_FOLDS),
                        metavar="K", help="folds to train, one after another (default: 0 1 2 3 4)")
    parser.add_argument("--device", choices=training.DEVICES, default="auto",
                        help="auto picks cuda, then mps, then cpu (default: auto)")
    parser.add_argument("--epochs", type=int, metavar="N",
                        help="epochs per fold (default: nnU-Net's 1000)")
    parser.add_argument("--results", type=Path, metavar="DIR",
                        help="nnU-Net results folder (default: nnUNet_results next to the raw "
                             "folder); the model is RESULTS/DatasetNNN_Name/"
                             f"{training.MODEL_SUBFOLDER}")
    parser.add_argument("--preprocessed", type=Path, metavar="DIR",
                        help="nnU-Net preprocessed folder (default: nnUNet_preprocessed next to "
                             "the raw folder)")
    parser.add_argument("--threads", type=int, metavar="N",
                        help="CPU threads for training and preprocessing (default: all cores)")


def run(args: argparse.Namespace) -> int:
    summary = training.train(
        args.dataset_dir, folds=args.folds, device=args.device, epochs=args.epochs,
        results=args.results, preprocessed=args.preprocessed, threads=args.threads,
        progress=_print_progress)
    print(f"\nModel folder: {summary.model_folder}")
    for fold in summary.folds:
        dice = ", ".join(f"{key} {value:.3f}" for key, value in fold.dice.items())
        print(f"  fold {fold.fold}: {dice} (mean {fold.mean_foreground_dice:.3f})")
    print(f"Summary: {summary.csv}\n         {summary.png}")
    print("Install it with `l3muscleseg model install " + summary.model_folder + "`.")
    return EXIT_OK


def _print_progress(update: training.TrainingProgress) -> None:
    print(update.message, flush=True)
