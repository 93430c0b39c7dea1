"""Child-process entry for background inference (the Slicer module runs it with PythonSlicer).

    python -m L3MuscleSegLib.worker --input IN.npz --output OUT.npz --model DIR [--folds K]

IN.npz holds ``pixels`` (float32 [rows, cols], canonical orientation) and ``spacing_mm``.
OUT.npz receives ``labels``, ``probabilities`` and ``result_json`` (QC, timings, device,
model provenance). Progress goes to stdout as ``L3PROGRESS <done> <total> <message>`` lines.
Exit codes follow the CLI: 0 ok, 1 failed (message on stderr), 2 bad usage.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from .commands._common import add_model_arguments, build_segmenter
from .errors import L3MuscleSegError
from .export import atomic_path
from .geometry import slice_from_array

PROGRESS_PREFIX = "L3PROGRESS"


def parse_progress(line: str) -> tuple[int, int, str] | None:
    """(done, total, message) from a worker progress line, else None."""
    parts = line.split(" ", 3)
    if len(parts) < 3 or parts[0] != PROGRESS_PREFIX:
        return None
    return int(parts[1]), int(parts[2]), parts[3] if len(parts) > 3 else ""


def _print_progress(done: int, total: int, message: str) -> None:
    print(f"{PROGRESS_PREFIX} {done} {total} {message}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m L3MuscleSegLib.worker")
    parser.add_argument("--input", required=True)
    parser.add_argument("--output", required=True)
    add_model_arguments(parser)
    args = parser.parse_args(argv)
    try:
        with np.load(args.input) as data:
            slice_ = slice_from_array(data["pixels"], tuple(data["spacing_mm"]))
        segmenter = build_segmenter(args)
        result = segmenter.predict(slice_, progress=_print_progress)
        summary = {"model": segmenter.provenance(),
                   "qc": None if result.qc is None else result.qc.to_dict(),
                   "device": result.device, "tta": result.tta, "folds": list(result.folds),
                   "timings_s": result.timings}
        with atomic_path(args.output, overwrite=True) as temp, open(temp, "wb") as stream:
            np.savez_compressed(stream, labels=result.labels,
                                probabilities=result.probabilities,
                                result_json=json.dumps(summary))
    except L3MuscleSegError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
