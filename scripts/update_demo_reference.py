"""Record the demo model's prediction on one fixed phantom as the committed test reference.

    .venv/bin/python scripts/update_demo_reference.py

TTA is off, as in the test. Run it only after retraining the demo model
(scripts/train_demo_model.py); tests/test_demo_model.py then checks every later change
against this prediction.
"""

from pathlib import Path

import numpy as np

from L3MuscleSegLib.geometry import slice_from_array
from L3MuscleSegLib.inference import Segmenter
from L3MuscleSegLib.models import DEMO_MODEL_DIR
from L3MuscleSegLib.phantom import make_phantom_slice

REFERENCE = Path(__file__).resolve().parents[1] / "tests" / "data" / "demo_model_reference.npz"
SEED = 2_000_001  # outside the training seeds


def main() -> None:
    phantom = make_phantom_slice(SEED, size=256)
    slice_ = slice_from_array(phantom.image, phantom.spacing_mm)
    labels = Segmenter(DEMO_MODEL_DIR, device="cpu", tta=False).predict(slice_).labels
    REFERENCE.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(REFERENCE, image=phantom.image.astype(np.float32), labels=labels,
                        spacing_mm=np.asarray(phantom.spacing_mm))
    print(f"Wrote {REFERENCE}")


if __name__ == "__main__":
    main()
