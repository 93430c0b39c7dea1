"""Cohort batch runs: manifest checks, the cohort CSV, a local pool and a real Dask cluster.

The segmenter is a real ``inference.Segmenter`` on a tiny nnU-Net model that nnU-Net's own
planner and checkpoint format produce (tests/nnunet_fixtures.py, cached between runs), with
TTA off: the cheapest model that exercises the whole pipeline, fold ensembling and QC included.
The CTs are that fixture's synthetic phantoms (64 x 64 pixels of 4 mm, the model's own
grid), so each fold predicts one patch. Worker start-up (importing torch and nnU-Net,
loading the model) dominates the run time, not the cases. Predictions need not be good:
these tests check scheduling and bookkeeping, not accuracy.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from nnunet_fixtures import SLICE_MM, SPACING_MM, tiny_case

from L3MuscleSegLib.cli import main
from L3MuscleSegLib.cohort import (
    COHORT_CSV,
    CohortCase,
    CohortTable,
    WorkerSetupError,
    read_manifest,
    run_batch,
)
from L3MuscleSegLib.errors import InputError
from L3MuscleSegLib.inference import Segmenter
from L3MuscleSegLib.pipeline import report_path

Z0_MM = -300.0
MANIFEST = """case_id,path,slice,z_mm,height_m,sex,reference
p0,ct/p0.nii.gz,1,,1.70,F,ct/p0-ref.nii.gz
p1,ct/p1.nrrd,,{z_p1},,M,
p2,ct/p2.nii.gz,0,,,,
missing,ct/nothere.nii.gz,1,,,,
outofrange,ct/p0.nii.gz,99,,,,
"""


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def factory(tiny_model):
    return functools.partial(Segmenter, tiny_model, folds="all", device="cpu", tta=False)


def write_phantom(folder, case_id: str, seed: int, suffix: str = ".nii.gz") -> float:
    """A 3-slice phantom CT and its reference labels; returns the LPS z of the middle slice."""
    image, labels = zip(*(tiny_case(seed * 10 + k) for k in range(3)), strict=True)
    folder.mkdir(exist_ok=True)
    for array, name in ((image, f"{case_id}{suffix}"), (labels, f"{case_id}-ref.nii.gz")):
        volume = sitk.GetImageFromArray(np.stack(array))
        volume.SetSpacing((SPACING_MM, SPACING_MM, SLICE_MM))
        volume.SetOrigin((0.0, 0.0, Z0_MM))
        sitk.WriteImage(volume, str(folder / name))
    return Z0_MM + SLICE_MM


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    """The manifest above: three phantoms and two bad cases."""
    root = tmp_path_factory.mktemp("cohort")
    write_phantom(root / "ct", "p0", 10)
    z_p1 = write_phantom(root / "ct", "p1", 11, ".nrrd")
    write_phantom(root / "ct", "p2", 12)
    (root / "manifest.csv").write_text(MANIFEST.format(z_p1=z_p1))
    return root / "manifest.csv"


@pytest.fixture(scope="module")
def cohort(manifest):
    return read_manifest(manifest)


@pytest.fixture(scope="module")
def local_run(cohort, factory, tmp_path_factory):
    out = tmp_path_factory.mktemp("local") / "out"
    events = []
    summary = run_batch(cohort, out, factory, workers=2, progress=events.append)
    return out, summary, events


# ---------------------------------------------------------------- manifest and table


def test_manifest_rows_are_parsed_and_paths_resolved(cohort):
    by_id = {case.case_id: case for case in cohort}
    assert [case.case_id for case in cohort] == ["p0", "p1", "p2", "missing", "outofrange"]
    p0, p1 = by_id["p0"], by_id["p1"]
    assert p0.path.is_file() and p0.path.is_absolute()
    assert (p0.slice_index, p0.z_mm, p0.height_m, p0.sex) == (1, None, 1.70, "F")
    assert p0.reference.name == "p0-ref.nii.gz"
    assert p1.slice_index is None and p1.z_mm == pytest.approx(Z0_MM + 5.0)
    assert p1.reference is None and p1.height_m is None


def test_manifest_reports_every_bad_row_before_running(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("case_id,path,slice,z_mm,height_m\n"
                        "a,a.nii.gz,3,12.5,\n"  # both slice and z
                        "b,b.nii.gz,,,\n"  # neither
                        "c,c.nii.gz,top,,\n"  # not an index
                        "d,d.nii.gz,auto,,175\n"  # height in cm
                        "a,e.nii.gz,1,,\n")  # duplicate id
    with pytest.raises(InputError) as error:
        read_manifest(manifest)
    message = str(error.value)
    for expected in ("used more than once: a", "line 2", "line 3", "'top'", "175"):
        assert expected in message
    manifest.write_text("case_id,ct\nx,x.nii.gz\n")
    with pytest.raises(InputError, match="needs case_id, path"):
        read_manifest(manifest)
    manifest.write_text("case_id,path,slice\nx,x.nii.gz,AUTO\n")
    assert read_manifest(manifest)[0].slice_index == "auto"


def test_cohort_table_appends_lines_and_rewrites_when_columns_grow(tmp_path):
    path = tmp_path / COHORT_CSV
    table = CohortTable(path, [{"case_id": "a", "status": "ok", "error": "", "x": 1.5}])
    inode = path.stat().st_ino
    table.add({"case_id": "b", "status": "failed", "error": "bad, \"quoted\""})
    assert path.stat().st_ino == inode  # appended in place
    assert path.read_text().count("\n") == 3
    table.add({"case_id": "c", "status": "ok", "error": "", "x": 2.0, "y": True})
    assert path.stat().st_ino != inode  # new column "y": replaced by a rewritten file
    table.rewrite(order=["c", "a", "b"])
    frame = pd.read_csv(path)
    assert list(frame["case_id"]) == ["c", "a", "b"]
    assert list(frame.columns) == ["case_id", "status", "error", "sex", "x", "y"]
    assert frame.loc[2, "error"] == 'bad, "quoted"'
    assert frame.loc[0, "x"] == 2.0


def test_batch_refuses_a_folder_of_other_files(tmp_path, cohort):
    (tmp_path / "p0-label.nii.gz").write_bytes(b"someone else's reference")
    with pytest.raises(InputError, match="not a batch output folder"):
        run_batch(cohort, tmp_path, factory=None)


# ---------------------------------------------------------------- local pool


def test_a_model_that_cannot_load_stops_the_run(tmp_path, cohort):
    factory = functools.partial(Segmenter, tmp_path / "no-model", device="cpu")
    with pytest.raises(WorkerSetupError, match="no-model"):
        run_batch(cohort[:1], tmp_path / "out", factory)


def test_local_pool_records_failures_and_writes_every_case(local_run):
    out, summary, events = local_run
    assert summary.exit_code == 2
    failed = dict(summary.failures)
    assert set(failed) == {"missing", "outofrange"}
    assert "not found" in failed["missing"]
    assert "out of range" in failed["outofrange"]
    table = pd.read_csv(out / COHORT_CSV)
    assert list(table["case_id"]) == ["p0", "p1", "p2", "missing", "outofrange"]
    assert list(table["status"]) == ["ok"] * 3 + ["failed"] * 2
    ok = table.set_index("case_id").loc[["p0", "p1", "p2"]]
    assert ok["qc_score"].between(0, 1).all()
    assert set(ok["review_recommended"]) <= {True, False}
    assert list(ok["sex"].fillna("")) == ["F", "M", ""]
    assert ok.loc["p0", "smi_cm2_m2"] > 0 and 0 <= ok.loc["p0", "mean_dice"] <= 1
    assert pd.isna(ok.loc["p1", "mean_dice"])  # no reference given
    assert ok.loc["p1", "slice_index"] == 1  # z of the middle slice
    for case in ("p0", "p1", "p2"):
        assert (out / f"{case}-label.nii.gz").is_file()
    assert [e.done for e in events] == [0, 1, 2, 3, 4, 5]
    assert events[0].case_id is None and events[-1].eta_s == 0
    assert events[-1].failed == 2 and events[-1].rate_per_min > 0


def test_cli_rerun_skips_cases_whose_reports_say_done(local_run, manifest, tiny_model, capsys):
    out = local_run[0]
    report_path(out, "p2").unlink()  # p2 unfinished: its report is the proof
    kept = {c: report_path(out, c).stat().st_mtime_ns for c in ("p0", "p1")}
    rows_before = pd.read_csv(out / COHORT_CSV).set_index("case_id")
    exit_code = main(["batch", str(manifest), "--model", str(tiny_model), "--out", str(out),
                      "--device", "cpu", "--no-tta"])
    assert exit_code == 2  # the two bad cases, retried and failed again
    printed = capsys.readouterr()
    assert "5 cases: 1 done now, 2 done before, 2 failed" in printed.out
    assert "5 cases, 2 already done" in printed.err and "[5/5]" in printed.err
    assert "FAILED missing: CT not found" in printed.err
    assert {c: report_path(out, c).stat().st_mtime_ns for c in kept} == kept
    assert report_path(out, "p2").is_file()
    rows = pd.read_csv(out / COHORT_CSV).set_index("case_id")
    assert list(rows.index) == list(rows_before.index)
    pd.testing.assert_series_equal(rows.loc["p0"], rows_before.loc["p0"])  # from its report
    assert rows.loc["p2", "total_area_cm2"] == pytest.approx(
        rows_before.loc["p2", "total_area_cm2"])


# ---------------------------------------------------------------- Dask


def test_dask_cluster_survives_a_killed_worker(tmp_path, factory, local_run):
    distributed = pytest.importorskip("distributed")
    ct = tmp_path / "ct"
    cases = [CohortCase(f"d{seed}", ct / f"d{seed}.nii.gz", slice_index=1)
             for seed in range(6)]
    for seed in range(6):
        write_phantom(ct, f"d{seed}", 10 + seed)  # d0, d1: the CTs of p0, p1
    out = tmp_path / "out"
    killed = []
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None, silence_logs=logging.ERROR) as cluster, \
            distributed.Client(cluster, set_as_default=False) as client:
        pids = client.run(os.getpid)

        def kill_a_busy_worker(progress):
            if progress.case_id is None or killed:
                return
            busy = [addr for addr, keys in client.processing().items() if keys]
            os.kill(pids[busy[0]], signal.SIGKILL)
            killed.append(pids[busy[0]])

        summary = run_batch(cases, out, factory, scheduler=cluster.scheduler_address,
                            progress=kill_a_busy_worker)
        assert killed and killed[0] not in client.run(os.getpid).values()
    assert summary.failures == () and summary.succeeded == 6
    table = pd.read_csv(out / COHORT_CSV)
    assert sorted(table["case_id"]) == [c.case_id for c in cases]  # none lost or doubled
    assert (table["status"] == "ok").all()
    assert all(report_path(out, c.case_id).is_file() for c in cases)
    local_out = local_run[0]
    for dask_case, local_case in (("d0", "p0"), ("d1", "p1")):  # same CT, slice, model
        np.testing.assert_array_equal(_labels(out / f"{dask_case}-label.nii.gz"),
                                      _labels(local_out / f"{local_case}-label.nii.gz"))


def _labels(path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
