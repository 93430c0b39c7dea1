"""Child-process entries for nnU-Net steps started by :mod:`.training`.

``train`` runs one 2D fold. It builds nnU-Net's standard ``nnUNetTrainer`` exactly as
``nnUNetv2_train`` does and only shortens its schedule (epochs, iterations, learning rate) before
training. No trainer subclass is made, so checkpoints name the trainer "nnUNetTrainer"
and the results folder is ``nnUNetTrainer__nnUNetPlans__2d``, which ``nnUNetv2_predict``
and ``nnUNetPredictor`` load. nnU-Net's folders come from the ``nnUNet_raw``,
``nnUNet_preprocessed`` and ``nnUNet_results`` variables the parent sets for the child only.

``preprocess`` runs nnU-Net's 2d preprocessing for plans that already exist (possibly
edited after planning).

    python -m L3MuscleSegLib._nnunet_child train DATASET_ID FOLD [--epochs N] [--continue]
    python -m L3MuscleSegLib._nnunet_child preprocess DATASET_ID [--processes N]
"""

from __future__ import annotations

import argparse
import os
import sys


def _parse(argv) -> argparse.Namespace:
    main = argparse.ArgumentParser(prog="python -m L3MuscleSegLib._nnunet_child")
    steps = main.add_subparsers(dest="step", required=True)
    prep = steps.add_parser("preprocess")
    prep.add_argument("dataset", type=int, help="nnU-Net dataset ID")
    prep.add_argument("--processes", type=int, default=1)
    parser = steps.add_parser("train")
    parser.add_argument("dataset", help="nnU-Net dataset ID or DatasetNNN_Name")
    parser.add_argument("fold", type=int)
    parser.add_argument("--configuration", default="2d")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"))
    parser.add_argument("--epochs", type=int, help="default: nnU-Net's 1000")
    parser.add_argument("--iterations", type=int, help="training iterations per epoch")
    parser.add_argument("--val-iterations", type=int, help="validation iterations per epoch")
    parser.add_argument("--initial-lr", type=float, help="default: nnU-Net's 0.01")
    parser.add_argument("--save-every", type=int, default=1,
                        help="epochs between checkpoint_latest.pth saves (for resuming)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--init-weights", help="nnU-Net checkpoint of the same network and "
                        "labels whose weights (all layers) a new fold starts from")
    parser.add_argument("--continue", dest="resume", action="store_true",
                        help="resume from checkpoint_latest.pth / checkpoint_final.pth")
    return main.parse_args(argv)


def _device(name: str, threads: int):
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else (
            "mps" if torch.backends.mps.is_available() else "cpu")
    if name == "cpu":
        torch.set_num_threads(max(1, threads))
    else:
        torch.set_num_threads(1)  # as nnUNetv2_train: extra threads do not help a GPU
    print(f"L3MuscleSeg: training on {name}", flush=True)
    return torch.device(name)


def _preprocess(args: argparse.Namespace) -> int:
    from nnunetv2.experiment_planning.plan_and_preprocess_api import preprocess

    preprocess([args.dataset], configurations=("2d",), num_processes=[max(1, args.processes)],
               show_progress_bar=False)
    return 0


def _train(args: argparse.Namespace) -> int:
    from nnunetv2.run.run_training import get_trainer_from_args, maybe_load_checkpoint

    device = _device(args.device, args.threads)
    trainer = get_trainer_from_args(args.dataset, args.configuration, args.fold,
                                    continue_training=args.resume, device=device)
    # Before initialize(): the optimiser and its schedule are built from these.
    if args.initial_lr:
        trainer.initial_lr = args.initial_lr
    if args.epochs:
        trainer.num_epochs = args.epochs
    if args.iterations:
        trainer.num_iterations_per_epoch = args.iterations
    if args.val_iterations:
        trainer.num_val_iterations_per_epoch = args.val_iterations
    trainer.save_every = max(1, args.save_every)
    maybe_load_checkpoint(trainer, args.resume, False)
    if args.init_weights and not args.resume:
        _load_all_weights(trainer, args.init_weights)
    trainer.run_training()
    trainer.perform_actual_validation(False)
    return 0


def _load_all_weights(trainer, checkpoint_file: str) -> None:
    """Like nnU-Net's -pretrained_weights, but keeping the segmentation layers too."""
    import torch

    trainer.initialize()
    weights = torch.load(checkpoint_file, map_location="cpu", weights_only=False)
    network = getattr(trainer.network, "_orig_mod", trainer.network)  # torch.compile
    network.load_state_dict(weights["network_weights"])
    print(f"L3MuscleSeg: started from the weights in {checkpoint_file}", flush=True)


def main(argv=None) -> int:
    args = _parse(argv)
    return _preprocess(args) if args.step == "preprocess" else _train(args)


if __name__ == "__main__":
    sys.exit(main())
