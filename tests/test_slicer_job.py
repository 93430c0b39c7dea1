"""SegmentationJob with real child processes: progress, results, errors and tree-killing cancel.

Small Python children stand in for the worker where only the job machinery is under test;
the last tests run the real ``L3MuscleSegLib.worker`` (a bad model, then a tiny nnU-Net
model) and put the result into a real MRML scene.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import numpy as np
import psutil
import pytest
from slicer_harness import MODULE_DIR, add_volume, new_mrml_app
from slicer_harness import mrml_logic as logic

from L3MuscleSegLib.errors import L3MuscleSegError
from L3MuscleSegLib.geometry import slice_from_array

WRITES_RESULT = """
import json, sys
import numpy as np
print("L3PROGRESS 1 2 fold 0", flush=True)
print("a log line", flush=True)
print("L3PROGRESS 2 2 fold 1", flush=True)
labels = np.zeros((4, 5), np.uint8)
labels[1, 2], labels[3, 4] = 1, {value}
np.savez(sys.argv[1], labels=labels, probabilities=np.zeros((4, 4, 5), np.float32),
         result_json=json.dumps({{"qc": {{"score": 0.8, "review_recommended": False}}}}))
"""

SPAWNS_AND_SLEEPS = """
import os, subprocess, sys, time
grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
print("PIDS", os.getpid(), grandchild.pid, flush=True)
time.sleep(120)
"""


def python_job(code: str, tmp_path, expected_shape=(4, 5)) -> logic.SegmentationJob:
    output = tmp_path / "out.npz"
    argv = [sys.executable, "-c", textwrap.dedent(code), str(output)]
    return logic.SegmentationJob(argv, output, expected_shape=expected_shape)


def finished(job: logic.SegmentationJob, timeout: float = 30.0) -> logic.SegmentationJob:
    job.start()
    assert job.wait(timeout), "job did not finish"
    return job


def test_progress_log_and_result_arrive(tmp_path):
    job = finished(python_job(WRITES_RESULT.format(value=3), tmp_path))
    assert job.error is None
    events = job.poll()
    assert [(e.kind, e.done, e.total, e.text) for e in events] == [
        ("progress", 1, 2, "fold 0"), ("log", 0, 0, "a log line"), ("progress", 2, 2, "fold 1")]
    assert job.poll() == []
    assert job.result.labels.dtype == np.uint8
    assert job.result.labels[1, 2] == 1 and job.result.labels[3, 4] == 3
    assert job.result.labels.sum() == 4
    assert job.result.probabilities.shape == (4, 4, 5)
    assert job.result.summary["qc"]["score"] == 0.8


def test_cancel_kills_the_whole_child_tree(tmp_path):
    job = python_job(SPAWNS_AND_SLEEPS, tmp_path)
    job.start()
    deadline, pids = time.monotonic() + 20, None
    while pids is None and time.monotonic() < deadline:
        lines = [e.text for e in job.poll() if e.text.startswith("PIDS")]
        pids = [int(p) for p in lines[0].split()[1:]] if lines else None
        time.sleep(0.05)
    assert pids is not None, "child never reported its process ids"
    assert all(psutil.pid_exists(pid) for pid in pids)
    job.cancel()
    assert job.wait(20)
    assert job.cancelled and job.result is None
    assert "Cancelled" in str(job.error)
    _, alive = psutil.wait_procs([_process(pid) for pid in pids if _process(pid)], timeout=5)
    assert [p for p in alive if p.status() != psutil.STATUS_ZOMBIE] == []


def _process(pid: int) -> psutil.Process | None:
    try:
        return psutil.Process(pid)
    except psutil.NoSuchProcess:
        return None


def test_command_job_without_output_file():
    code = "print('L3PROGRESS 3 10 epoch 3', flush=True); print('loss 0.5')"
    job = finished(logic.CommandJob([sys.executable, "-c", code]))
    assert job.error is None and not job.cancelled
    assert [(e.kind, e.text) for e in job.poll()] == [("progress", "epoch 3"),
                                                      ("log", "loss 0.5")]


def test_module_imports_with_only_what_slicer_bundles():
    """The widget imports the logic before it installs torch, matplotlib, psutil, ..."""
    blocked = ("torch", "nnunetv2", "matplotlib", "psutil", "pandas", "scipy", "nibabel")
    code = (f"import sys; sys.path.insert(0, {str(MODULE_DIR)!r}); "
            f"sys.modules.update(dict.fromkeys({blocked!r})); "
            "import L3MuscleSegMRML; print('imported')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "imported" in done.stdout


def test_failing_child_gives_its_message(tmp_path):
    code = "import sys; print('error: the model folder is empty', file=sys.stderr); sys.exit(1)"
    job = finished(python_job(code, tmp_path))
    assert job.result is None and not job.cancelled
    assert "exit code 1" in str(job.error) and "the model folder is empty" in str(job.error)


@pytest.mark.parametrize(("code", "message"), [
    ("pass", "without writing its result"),
    (WRITES_RESULT.format(value=9), "label values 9"),
])
def test_bad_output_is_an_error(tmp_path, code, message):
    job = finished(python_job(code, tmp_path))
    assert job.result is None
    assert message in str(job.error)


def test_real_worker_reports_a_bad_model(tmp_path):
    pytest.importorskip("L3MuscleSegLib.inference")
    slice_ = slice_from_array(np.full((8, 8), -1000.0, np.float32), (1.0, 1.0))
    job = finished(logic.SegmentationJob.for_slice(slice_, tmp_path / "no-such-model",
                                                   device="cpu"), timeout=120)
    assert isinstance(job.error, L3MuscleSegError)
    assert "no-such-model" in str(job.error)
    assert not job.output_path.parent.exists()  # the job's temp folder is gone


@pytest.mark.slow
def test_real_inference_job_into_the_scene(tiny_model):
    from nnunet_fixtures import SPACING_MM, tiny_case

    from L3MuscleSegLib.inference import validate_model_folder

    image, _ = tiny_case(5)
    app = new_mrml_app()
    matrix = np.diag([-SPACING_MM, -SPACING_MM, 5.0, 1.0])  # LPS identity in RAS
    node = add_volume(image[None].astype(np.int16), matrix)
    slice_ = logic.pick_slice(node, 0)
    job = finished(logic.SegmentationJob.for_slice(slice_, tiny_model, device="cpu",
                                                   tta=False), timeout=300)
    assert job.error is None, job.error
    events = job.poll()
    assert any(e.kind == "progress" for e in events)
    assert job.result.labels.shape == image.shape
    assert job.result.summary["folds"] == list(validate_model_folder(tiny_model).folds)
    segmentation = logic.apply_result(node, slice_, job.result.labels, result=job.result.summary)
    assert segmentation.GetScene() is app.scene
    np.testing.assert_array_equal(logic.labels_from_segmentation(segmentation, node, slice_),
                                  job.result.labels)
    assert logic.stored_result(segmentation) == job.result.summary


@pytest.mark.slow
def test_demo_model_job_segments_a_phantom_in_the_scene(tmp_path):
    """The bundled demo model in a PythonSlicer-style child, result exported as in Slicer."""
    pytest.importorskip("L3MuscleSegLib.inference")
    from L3MuscleSegLib.metrics import compute_metrics
    from L3MuscleSegLib.models import DEMO_MODEL_DIR
    from L3MuscleSegLib.phantom import make_phantom_volume

    if not DEMO_MODEL_DIR.is_dir():
        pytest.skip(f"demo model not built yet: {DEMO_MODEL_DIR}")
    volume, truth = make_phantom_volume(2026, n_slices=3, size=256)
    app = new_mrml_app()
    node = add_volume(volume.array, volume.geometry.ijk_to_ras())
    slice_ = logic.pick_slice(node, 1)
    job = finished(logic.SegmentationJob.for_slice(slice_, DEMO_MODEL_DIR, device="cpu",
                                                   tta=False), timeout=600)
    assert job.error is None, job.error
    segmentation = logic.apply_result(node, slice_, job.result.labels, result=job.result.summary)
    assert segmentation.GetScene() is app.scene
    metrics = compute_metrics(slice_.pixels, job.result.labels, slice_.spacing_mm, truth[1])
    assert metrics.mean_dice > 0.8
    exported = logic.export_case(tmp_path, "phantom", node, segmentation, slice_)
    assert exported.case.row["qc_score"] == job.result.summary["qc"]["score"]
