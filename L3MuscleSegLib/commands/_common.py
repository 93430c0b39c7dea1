"""Options and helpers shared by several sub-commands."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import InputError
from ..geometry import VOLUME_SUFFIXES


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="NAME_OR_DIR",
                        help="installed model name[:version] or nnU-Net v2 trained model "
                             "folder (dataset.json, plans.json, fold_k/)")
    parser.add_argument("--folds", default="all", metavar="all|K",
                        help="'all' for the ensemble of every fold (default), or one fold")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"))
    parser.add_argument("--no-tta", dest="tta", action="store_false",
                        help="turn test-time mirroring off (faster, slightly less robust)")
    parser.add_argument("--checkpoint", default="checkpoint_final.pth",
                        choices=("checkpoint_final.pth", "checkpoint_best.pth"))
    parser.add_argument("--threads", type=_positive_int, metavar="N",
                        help="CPU threads for inference (default: every available CPU, as "
                             "nnUNetv2_predict; fewer when the machine is busy with other work)")


def parse_folds(text: str) -> str | list[int]:
    if text == "all":
        return "all"
    if text.isdigit():
        return [int(text)]
    raise InputError(f"--folds {text!r}: use 'all' or one fold number such as 0.")


def build_segmenter(args: argparse.Namespace):
    from ..inference import Segmenter
    from ..models import resolve_model

    return Segmenter(resolve_model(args.model), folds=parse_folds(args.folds),
                     device=args.device, tta=args.tta, checkpoint=args.checkpoint,
                     num_threads=args.threads)


def case_id_from_path(path: Path) -> str:
    """The file name without its image suffix (a DICOM folder keeps its name)."""
    name = path.name
    for suffix in sorted(VOLUME_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _positive_int(text: str) -> int:
    if text.isdigit() and int(text) > 0:
        return int(text)
    raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number, such as 2.")


def stderr_progress(done: int, total: int, message: str) -> None:
    print(f"[{done}/{total}] {message}", file=sys.stderr, flush=True)
