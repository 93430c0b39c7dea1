"""Batch segmentation of a cohort: resumable, on a local process pool or a Dask cluster.

A manifest CSV lists the cases. Every case runs :func:`process_case`, the same function on
the local pool and on Dask, with the segmenter its worker process built once (the pool's
initializer, or :class:`SegmenterPlugin` on Dask). A failing case becomes a "failed" row
and the run goes on.

A case is finished when :func:`pipeline.is_case_done` says so: its JSON report, written
last, says ok and the outputs it lists exist. A rerun skips those. The reports are the
truth; the cohort CSV is rebuilt from them when a run starts, gets one complete line
appended per case as results arrive (in order of completion), and is rewritten in manifest
order at the end. Every rewrite is atomic.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from .errors import InputError, L3MuscleSegError, ModelError
from .export import atomic_path
from .metrics import check_height
from .pipeline import Predictor, is_case_done, report_path, segment_case

try:
    from distributed import WorkerPlugin
except ImportError:  # Dask is optional: only a --scheduler run needs it
    WorkerPlugin = object

log = logging.getLogger(__name__)

COHORT_CSV = "cohort.csv"
REQUIRED_COLUMNS = ("case_id", "path")
SLICE_COLUMNS = ("slice", "z_mm")
OPTIONAL_COLUMNS = ("height_m", "sex", "reference")
AUTO = "auto"
MAX_EXIT_CODE = 125  # exit codes above 125 mean "killed by a signal" to shells
PLUGIN_NAME = "l3muscleseg-segmenter"
_FIRST_COLUMNS = ("case_id", "status", "error", "sex")

SegmenterFactory = Callable[[], Predictor]


@dataclass(frozen=True)
class CohortCase:
    """One manifest row, validated; paths resolved against the manifest's folder."""

    case_id: str
    path: Path
    slice_index: int | str | None = None  # a source slice index, "auto", or None with z_mm
    z_mm: float | None = None
    height_m: float | None = None
    sex: str | None = None
    reference: Path | None = None


@dataclass(frozen=True)
class CaseOutcome:
    case_id: str
    row: dict  # the cohort-CSV row: status "ok" with metrics and QC, or "failed" with error

    @property
    def ok(self) -> bool:
        return self.row["status"] == "ok"


@dataclass(frozen=True)
class BatchProgress:
    done: int  # finished now or before (skipped), ok or failed
    total: int
    failed: int
    skipped: int  # finished by an earlier run
    rate_per_min: float | None  # cases finished per minute in this run
    eta_s: float | None
    case_id: str | None  # the case that just finished; None for the first report


@dataclass(frozen=True)
class BatchSummary:
    total: int
    skipped: int
    succeeded: int  # in this run
    failures: tuple[tuple[str, str], ...]  # (case id, error)
    csv_path: Path

    @property
    def exit_code(self) -> int:
        """The number of failed cases, capped at 125."""
        return min(len(self.failures), MAX_EXIT_CODE)


class WorkerSetupError(ModelError):
    """A worker could not build its segmenter: the whole run stops, no case is to blame."""


# ---------------------------------------------------------------- manifest


def read_manifest(path: str | Path) -> tuple[CohortCase, ...]:
    """Cases from a CSV with case_id, path, slice and/or z_mm, and optional height_m, sex,
    reference. Every row is checked before anything runs; all bad rows are reported."""
    path = Path(path)
    table = _read_table(path)
    problems = []
    for column in table.columns[table.columns.duplicated()]:
        problems.append(f"column {column!r} appears twice")
    duplicated = table["case_id"][table["case_id"].duplicated()].unique()
    if len(duplicated):
        problems.append(f"case ids used more than once: {', '.join(duplicated[:10])}")
    cases = []
    for line, record in enumerate(table.to_dict("records"), start=2):
        try:
            cases.append(_manifest_case(record, path.parent))
        except InputError as err:
            problems.append(f"line {line}: {err}")
    if problems:
        raise InputError(f"Manifest '{path}' cannot be used:\n  " + "\n  ".join(problems[:20]))
    if not cases:
        raise InputError(f"Manifest '{path}' lists no cases; add one row per case.")
    return tuple(cases)


def _read_table(path: Path) -> pd.DataFrame:
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except FileNotFoundError:
        raise InputError(f"Manifest not found: '{path}'. Check the path.") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise InputError(f"Manifest '{path}' is not a readable CSV file: {err}.") from None
    table.columns = [str(c).strip() for c in table.columns]
    missing = [c for c in REQUIRED_COLUMNS if c not in table.columns]
    if missing or not set(SLICE_COLUMNS) & set(table.columns):
        raise InputError(
            f"Manifest '{path}' has columns {list(table.columns)}; it needs "
            f"{', '.join(REQUIRED_COLUMNS)} and at least one of {' or '.join(SLICE_COLUMNS)} "
            f"(optional: {', '.join(OPTIONAL_COLUMNS)})."
        )
    unknown = set(table.columns) - {*REQUIRED_COLUMNS, *SLICE_COLUMNS, *OPTIONAL_COLUMNS}
    if unknown:
        log.warning("Manifest '%s': ignoring columns %s.", path, ", ".join(sorted(unknown)))
    return table.apply(lambda column: column.str.strip())


def _manifest_case(record: dict, base: Path) -> CohortCase:
    case_id = record["case_id"]
    if not case_id or case_id in (".", "..") or any(s in case_id for s in "/\\\0"):
        raise InputError(f"case_id {case_id!r} cannot name files; use e.g. 'case001'.")
    slice_text, z_text = record.get("slice", ""), record.get("z_mm", "")
    if bool(slice_text) == bool(z_text):
        raise InputError(
            f"case {case_id}: give exactly one of slice (index or 'auto') and z_mm; got "
            f"slice={slice_text!r}, z_mm={z_text!r}."
        )
    return CohortCase(
        case_id=case_id,
        path=_resolve(record["path"], base, "path", case_id),
        slice_index=_slice_value(slice_text, case_id),
        z_mm=_number(z_text, "z_mm", case_id),
        height_m=check_height(_number(record.get("height_m", ""), "height_m", case_id)),
        sex=record.get("sex") or None,
        reference=_resolve(record.get("reference", ""), base, "reference", case_id),
    )


def _resolve(text: str, base: Path, column: str, case_id: str) -> Path | None:
    if not text:
        if column == "path":
            raise InputError(f"case {case_id}: the path column is empty; give the CT's path.")
        return None
    path = Path(text).expanduser()
    return path if path.is_absolute() else base / path


def _slice_value(text: str, case_id: str) -> int | str | None:
    if not text:
        return None
    if text.lower() == AUTO:
        return AUTO
    if text.isdigit():
        return int(text)
    raise InputError(f"case {case_id}: slice {text!r} is neither a slice index such as 72 "
                     "nor 'auto'.")


def _number(text: str, column: str, case_id: str) -> float | None:
    if not text:
        return None
    try:
        return float(text)
    except ValueError:
        raise InputError(f"case {case_id}: {column} {text!r} is not a number.") from None


# ---------------------------------------------------------------- one case, in a worker

_worker: dict[str, Any] = {}  # this process's segmenter, or the error building it raised


def init_worker(factory: SegmenterFactory) -> None:
    """Build this worker process's segmenter once (pool initializer, Dask plugin setup).

    The segmenter serialises its own predictions, so a worker may run several threads.
    """
    _worker.clear()
    try:
        _worker["segmenter"] = factory()
    except Exception as err:  # reported by process_case: a pool cannot show it otherwise
        log.exception("The segmenter could not be built.")
        _worker["error"] = f"{type(err).__name__}: {err}"


def process_case(case: CohortCase, out_dir: str) -> CaseOutcome:
    """Segment one case with this worker's segmenter; a failure becomes a 'failed' row."""
    if "segmenter" not in _worker:
        raise WorkerSetupError(
            f"The worker has no segmenter ({_worker.get('error', 'init_worker was not run')})."
            " Check the model folder and --device; every worker must reach the model."
        )
    try:
        result = segment_case(
            case.path, case.case_id, out_dir, _worker["segmenter"],
            slice_index=case.slice_index, z_mm=case.z_mm, height_m=case.height_m,
            reference_path=case.reference,
            overwrite=True,  # only unfinished cases get here: replace their leftovers
        )
    except Exception as err:  # one bad case must not stop the cohort
        log.warning("Case %s failed: %s", case.case_id, err, exc_info=not isinstance(
            err, L3MuscleSegError))
        return CaseOutcome(case.case_id, _failed_row(case, err))
    return CaseOutcome(case.case_id, _ok_row(case, result.row))


def _ok_row(case: CohortCase, metrics_row: dict) -> dict:
    return {"case_id": case.case_id, "status": "ok", "error": "", "sex": case.sex,
            **metrics_row}


def _failed_row(case: CohortCase, err: BaseException) -> dict:
    message = str(err) if isinstance(err, L3MuscleSegError) else f"{type(err).__name__}: {err}"
    return {"case_id": case.case_id, "status": "failed", "error": message, "sex": case.sex}


class SegmenterPlugin(WorkerPlugin):
    """Builds the segmenter once per Dask worker, as the local pool's initializer does."""

    name = PLUGIN_NAME

    def __init__(self, factory: SegmenterFactory):
        self.factory = factory

    def setup(self, worker) -> None:
        init_worker(self.factory)

    def teardown(self, worker) -> None:
        _worker.clear()


# ---------------------------------------------------------------- executors


def _local_outcomes(cases: list[CohortCase], out_dir: Path, factory: SegmenterFactory,
                    workers: int) -> Iterator[CaseOutcome]:
    pool = ProcessPoolExecutor(
        max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
        initializer=init_worker, initargs=(factory,),
    )
    try:
        futures = {pool.submit(process_case, case, str(out_dir)): case for case in cases}
        for future in as_completed(futures):
            yield _outcome(future, futures[future])
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _dask_outcomes(cases: list[CohortCase], out_dir: Path, factory: SegmenterFactory,
                   scheduler: str) -> Iterator[CaseOutcome]:
    try:
        from distributed import Client
        from distributed import as_completed as dask_as_completed
    except ImportError:
        raise InputError("--scheduler needs Dask: pip install 'dask[distributed]'.") from None
    try:
        client = Client(scheduler, set_as_default=False, timeout=30)
    except OSError as err:
        raise InputError(f"Cannot reach the Dask scheduler at {scheduler}: {err}. Start it "
                         "with 'dask scheduler' and check the address.") from None
    with client:
        client.register_plugin(SegmenterPlugin(factory), name=PLUGIN_NAME)
        run = uuid.uuid4().hex[:8]
        futures = {client.submit(process_case, case, str(out_dir),
                                 key=f"l3muscleseg-{run}-{case.case_id}"): case
                   for case in cases}
        for future in dask_as_completed(futures, loop=client.loop):
            yield _outcome(future, futures[future])


def _outcome(future, case: CohortCase) -> CaseOutcome:
    """The case's outcome; a lost worker or crash (e.g. out of memory) fails only this case."""
    try:
        return future.result()
    except WorkerSetupError:
        raise
    except Exception as err:
        log.warning("Case %s was lost: %s", case.case_id, err)
        return CaseOutcome(case.case_id, _failed_row(case, err))


# ---------------------------------------------------------------- the cohort CSV


class CohortTable:
    """The cohort CSV: rewritten atomically, and appended one complete line per case.

    A row with a column the file lacks makes it rewrite the whole file with the new header.
    """

    def __init__(self, path: Path, rows: Iterable[dict] = ()):
        self.path = path
        self.rows = {row["case_id"]: row for row in rows}
        self.columns: list[str] = list(_FIRST_COLUMNS)
        self._add_columns(self.rows.values())
        self.rewrite()

    def add(self, row: dict) -> None:
        self.rows[row["case_id"]] = row
        if self._add_columns([row]):
            self.rewrite()
            return
        line = self._frame([row]).to_csv(header=False, index=False)
        with open(self.path, "a", encoding="utf-8", newline="") as stream:
            stream.write(line)  # one write of one complete line
            stream.flush()
            os.fsync(stream.fileno())

    def rewrite(self, order: Iterable[str] | None = None) -> None:
        ids = [i for i in order if i in self.rows] if order is not None else list(self.rows)
        with atomic_path(self.path, overwrite=True) as temp:
            self._frame([self.rows[i] for i in ids]).to_csv(temp, index=False)

    def _add_columns(self, rows: Iterable[dict]) -> bool:
        new = [key for row in rows for key in row if key not in self.columns]
        self.columns += list(dict.fromkeys(new))
        return bool(new)

    def _frame(self, rows: list[dict]) -> pd.DataFrame:
        return pd.DataFrame(rows, columns=self.columns).convert_dtypes()  # ints stay ints


def finished_row(case: CohortCase, out_dir: Path) -> dict:
    """The cohort row of a finished case, from its report."""
    report = json.loads(report_path(out_dir, case.case_id).read_text(encoding="utf-8"))
    return _ok_row(case, report["metrics"])


# ---------------------------------------------------------------- the batch


class _ProgressClock:
    def __init__(self, total: int, skipped: int, callback: Callable[[BatchProgress], None]):
        self.total, self.skipped, self.callback = total, skipped, callback
        self.ran = self.failed = 0
        self.started = time.monotonic()
        self._report(None)

    def finished(self, outcome: CaseOutcome) -> None:
        self.ran += 1
        self.failed += not outcome.ok
        self._report(outcome.case_id)

    def _report(self, case_id: str | None) -> None:
        elapsed = time.monotonic() - self.started
        per_s = self.ran / elapsed if self.ran and elapsed > 0 else None
        left = self.total - self.skipped - self.ran
        self.callback(BatchProgress(
            done=self.skipped + self.ran, total=self.total, failed=self.failed,
            skipped=self.skipped, rate_per_min=None if per_s is None else per_s * 60,
            eta_s=None if per_s is None else left / per_s, case_id=case_id,
        ))


def run_batch(cases: Iterable[CohortCase], out_dir: str | Path, factory: SegmenterFactory,
              *, workers: int = 1, scheduler: str | None = None, overwrite: bool = False,
              progress: Callable[[BatchProgress], None] | None = None) -> BatchSummary:
    """Segment every unfinished case; ``factory`` builds one segmenter per worker process.

    ``factory`` must pickle (e.g. ``functools.partial(Segmenter, model_dir)``). With
    ``scheduler`` (``tcp://host:port``) the cases run on that Dask cluster, whose workers
    must see the model folder, the CTs and ``out_dir`` at the same paths.
    """
    if workers < 1:
        raise InputError(f"--workers {workers}: use 1 or more worker processes.")
    cases = list(cases)
    out_dir = Path(out_dir)
    _check_out_dir(out_dir, overwrite)
    done = set() if overwrite else {c.case_id for c in cases if is_case_done(out_dir, c.case_id)}
    todo = [c for c in cases if c.case_id not in done]
    table = CohortTable(out_dir / COHORT_CSV,
                        [finished_row(c, out_dir) for c in cases if c.case_id in done])
    clock = _ProgressClock(len(cases), len(done), progress or (lambda _: None))
    failures = []
    if todo:
        outcomes = (_local_outcomes(todo, out_dir, factory, workers) if scheduler is None
                    else _dask_outcomes(todo, out_dir, factory, scheduler))
        for outcome in outcomes:
            table.add(outcome.row)
            if not outcome.ok:
                failures.append((outcome.case_id, outcome.row["error"]))
            clock.finished(outcome)
    table.rewrite(order=[c.case_id for c in cases])
    return BatchSummary(total=len(cases), skipped=len(done),
                        succeeded=len(todo) - len(failures), failures=tuple(failures),
                        csv_path=table.path)


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    """Refuse to write into a folder of other files, e.g. reference labels of the same names."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if not overwrite and any(out_dir.iterdir()) and not (out_dir / COHORT_CSV).is_file():
        raise InputError(
            f"'{out_dir}' holds files but no {COHORT_CSV}, so it is not a batch output folder "
            "and its files could be overwritten. Choose a new or empty folder, or pass "
            "--overwrite."
        )
