"""Fold agreement on tiny label maps whose scores are worked out by hand."""

from __future__ import annotations

import json

import numpy as np
import pytest

from L3MuscleSegLib.errors import InputError
from L3MuscleSegLib.qc import DEFAULT_REVIEW_THRESHOLD, dice, fold_agreement

A = np.array([[1, 1, 0],
              [2, 0, 0]], np.uint8)
B = np.array([[1, 0, 0],
              [2, 2, 0]], np.uint8)


def test_two_folds():
    qc = fold_agreement([A, B])
    # psoas: A 2 px, B 1 px, 1 shared → 2·1/3. paraspinal: A 1, B 2, 1 shared → 2/3.
    # abdominal wall: absent from both → 1.
    assert qc.class_dice[1] == pytest.approx(2 / 3)
    assert qc.class_dice[2] == pytest.approx(2 / 3)
    assert qc.class_dice[3] == 1.0
    # muscle in either fold: (0,0) (0,1) (1,0) (1,1); both agree at (0,0) and (1,0).
    assert qc.foreground_agreement == 0.5
    assert qc.score == pytest.approx(2 / 3) and qc.n_folds == 2
    assert qc.review_recommended()
    assert not qc.review_recommended(threshold=0.6)
    assert qc.summary == ("fold agreement 0.67 (psoas 0.67, paraspinal 0.67, "
                          "abdominal wall 1.00)")


def test_json_form_names_classes_and_the_verdict():
    data = json.loads(json.dumps(fold_agreement([A, B]).to_dict()))
    assert data == {
        "n_folds": 2, "score": pytest.approx(2 / 3),
        "class_dice": {"psoas": pytest.approx(2 / 3), "paraspinal": pytest.approx(2 / 3),
                       "abdominal_wall": 1.0},
        "foreground_agreement": 0.5, "review_recommended": True, "review_threshold": 0.9,
        "reason": ""}
    single = fold_agreement([A]).to_dict()
    assert single["score"] is None and single["class_dice"] == {}
    assert single["review_recommended"] is False and "single fold" in single["reason"]


def test_three_folds_average_the_three_pairs():
    c = np.array([[1, 1, 3],
                  [2, 0, 0]], np.uint8)
    qc = fold_agreement([A, B, c])
    # psoas pairs: A–B 2/3, A–C 1 (identical), B–C 2/3 → mean 7/9.
    assert qc.class_dice[1] == pytest.approx(7 / 9)
    # paraspinal pairs: A–B 2/3, A–C 1, B–C 2/3 → 7/9.
    assert qc.class_dice[2] == pytest.approx(7 / 9)
    # abdominal wall: only C has it → A–B 1, A–C 0, B–C 0 → 1/3.
    assert qc.class_dice[3] == pytest.approx(1 / 3)
    assert qc.score == pytest.approx(1 / 3)
    # muscle anywhere: (0,0) (0,1) (0,2) (1,0) (1,1); unanimous at (0,0) and (1,0).
    assert qc.foreground_agreement == pytest.approx(2 / 5)


def test_identical_folds_agree_fully():
    qc = fold_agreement([A, A.copy(), A.copy()])
    assert qc.score == 1.0 and qc.foreground_agreement == 1.0
    assert not qc.review_recommended()


def test_no_muscle_in_any_fold_is_full_agreement():
    empty = np.zeros((2, 2), np.uint8)
    qc = fold_agreement([empty, empty])
    assert qc.score == 1.0 and qc.foreground_agreement == 1.0


def test_single_fold_has_no_score():
    qc = fold_agreement([A])
    assert qc.n_folds == 1 and qc.score is None and qc.foreground_agreement is None
    assert "single fold" in qc.reason
    assert not qc.review_recommended()
    assert qc.summary.startswith("fold agreement not available: a single fold")


def test_default_threshold_is_documented_value():
    assert DEFAULT_REVIEW_THRESHOLD == 0.90


def test_bad_inputs_are_refused():
    with pytest.raises(InputError, match="at least one fold"):
        fold_agreement([])
    with pytest.raises(InputError, match="differ in shape"):
        fold_agreement([A, A[:, :2]])
    with pytest.raises(InputError, match="between 0 and 1; got 90"):
        fold_agreement([A, B]).review_recommended(90)


def test_dice_of_two_empty_masks_is_one():
    empty = np.zeros(3, bool)
    assert dice(empty, empty) == 1.0
    assert dice(np.array([True, False, False]), empty) == 0.0
