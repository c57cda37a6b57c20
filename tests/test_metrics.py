"""The metrics of `metrics.json`, checked against values worked out by hand."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from finetune.evaluate import (
    calibration_bins,
    classification_metrics,
    expected_calibration_error,
    roc_auc_one_vs_rest,
)

# Six images, three classes; two mistakes (image 1: true 0, predicted 1; image 3: true 1,
# predicted 2).
Y = np.array([0, 0, 1, 1, 2, 2])
P = np.array(
    [
        [0.7, 0.2, 0.1],
        [0.3, 0.6, 0.1],
        [0.1, 0.8, 0.1],
        [0.2, 0.3, 0.5],
        [0.1, 0.1, 0.8],
        [0.05, 0.05, 0.9],
    ]
)
NAMES = ["a", "b", "c"]


def test_hand_worked_example():
    m = classification_metrics(Y, P, NAMES)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 1, 1], [0, 0, 2]]
    assert m["confusion_matrix_normalized"] == [[0.5, 0.5, 0], [0, 0.5, 0.5], [0, 0, 1]]
    # precision = right / predicted, recall = right / true
    assert [m["per_class"][n]["precision"] for n in NAMES] == pytest.approx([1, 1 / 2, 2 / 3])
    assert [m["per_class"][n]["recall"] for n in NAMES] == pytest.approx([0.5, 0.5, 1])
    f1 = [2 / 3, 1 / 2, 0.8]
    assert [m["per_class"][n]["f1"] for n in NAMES] == pytest.approx(f1)
    assert m["macro_f1"] == pytest.approx(sum(f1) / 3)
    assert m["macro_precision"] == pytest.approx((1 + 1 / 2 + 2 / 3) / 3)
    assert m["macro_recall"] == pytest.approx(2 / 3)
    assert m["weighted_precision"] == pytest.approx(m["macro_precision"])  # equal supports
    assert m["weighted_recall"] == pytest.approx(m["accuracy"])
    assert m["weighted_f1"] == pytest.approx(sum(f1) / 3)  # equal supports
    assert [m["per_class"][n]["support"] for n in NAMES] == [2, 2, 2]
    assert m["top_k"] == 2 and m["top_k_accuracy"] == pytest.approx(1.0)
    # Class b: its positives score 0.8 and 0.3, its negatives 0.2, 0.6, 0.1, 0.05; 0.3 < 0.6 is
    # the one pair ranked wrongly out of 8. Classes a and c are ranked perfectly.
    assert [m["per_class"][n]["roc_auc"] for n in NAMES] == pytest.approx([1, 7 / 8, 1])
    assert m["roc_auc_ovr"] == pytest.approx((2 + 7 / 8) / 3)
    assert m["loss"] == pytest.approx(-np.mean(np.log(P[np.arange(6), Y])))
    json.dumps(m)  # JSON-ready


def test_roc_auc_matches_scikit_learn_when_every_class_is_present():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 200)
    p = rng.dirichlet(np.ones(4), 200)
    p[np.arange(200), y] += 0.3
    p /= p.sum(axis=1, keepdims=True)
    macro, _ = roc_auc_one_vs_rest(y, p, list("wxyz"))
    assert macro == pytest.approx(roc_auc_score(y, p, multi_class="ovr", average="macro"))


def test_roc_auc_skips_a_class_missing_from_the_labels():
    y = np.array([0, 0, 1, 1])
    p = np.array([[0.8, 0.1, 0.1], [0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.5, 0.4, 0.1]])
    macro, per_class = roc_auc_one_vs_rest(y, p, NAMES)
    assert per_class["c"] is None
    assert per_class["a"] == pytest.approx(1.0)
    assert macro == pytest.approx(1.0)
    m = classification_metrics(y, p, NAMES)
    assert m["confusion_matrix_normalized"][2] == [0, 0, 0]  # empty row, no division by zero


def test_macro_averages_cover_the_classes_with_images():
    # Images of a and b only; one b is taken for c. c has no images: no recall to average,
    # so the macro averages are over a and b (counting c's zeros would give 5/9 for F1).
    y = np.array([0, 0, 1, 1])
    p = np.array([[0.8, 0.1, 0.1], [0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.1, 0.3, 0.6]])
    m = classification_metrics(y, p, NAMES)
    assert m["averaged_over"] == ["a", "b"]
    assert m["per_class"]["c"]["precision"] == 0 and m["per_class"]["c"]["support"] == 0
    assert m["macro_recall"] == pytest.approx((1 + 0.5) / 2)
    assert m["macro_precision"] == pytest.approx(1.0)
    assert m["macro_f1"] == pytest.approx((1 + 2 / 3) / 2)
    assert "averaged_over" not in classification_metrics(Y, P, NAMES)  # every class there


def test_ece_of_an_over_confident_model():
    # Always 90% sure, right half the time: one bin, gap 0.4.
    y = np.array([0, 1, 0, 1])
    p = np.array([[0.9, 0.1]] * 4)
    assert expected_calibration_error(y, p) == pytest.approx(0.4)
    (row,) = calibration_bins(y, p)
    assert row["count"] == 4
    assert row["accuracy"] == pytest.approx(0.5)
    assert row["confidence"] == pytest.approx(0.9)
    assert row["lower"] < 0.9 <= row["upper"]


def test_ece_weights_bins_by_count():
    # 3 images at 0.62 confidence, all right (gap 0.38); 1 at 0.97, wrong (gap 0.97).
    y = np.array([0, 0, 0, 0])
    p = np.array([[0.62, 0.38]] * 3 + [[0.03, 0.97]])
    assert expected_calibration_error(y, p, bins=10) == pytest.approx((3 * 0.38 + 0.97) / 4)
    assert [r["count"] for r in calibration_bins(y, p, bins=10)] == [3, 1]


def test_ece_is_small_for_calibrated_probabilities():
    # Labels drawn from the predicted probabilities are calibrated by construction.
    rng = np.random.default_rng(1)
    p = rng.dirichlet(np.ones(3) * 0.5, 20000)
    y = np.array([rng.choice(3, p=row) for row in p])
    assert expected_calibration_error(y, p) < 0.02
    over = p**3 / (p**3).sum(axis=1, keepdims=True)  # sharpened: over-confident
    assert expected_calibration_error(y, over) > 0.1


def test_two_classes():
    y = np.array([0, 0, 1, 1, 1])
    p = np.array([[0.9, 0.1], [0.4, 0.6], [0.3, 0.7], [0.2, 0.8], [0.6, 0.4]])
    m = classification_metrics(y, p, ["no", "yes"])
    assert "top_k_accuracy" not in m
    assert m["accuracy"] == pytest.approx(3 / 5)
    # One-vs-rest with two classes is one ROC curve seen from both sides.
    assert m["per_class"]["no"]["roc_auc"] == pytest.approx(m["per_class"]["yes"]["roc_auc"])
    assert m["roc_auc_ovr"] == pytest.approx(roc_auc_score(y, p[:, 1]))
    assert m["weighted_recall"] == pytest.approx(3 / 5)


def test_a_confidence_on_a_bin_edge_falls_in_the_bin_it_closes():
    # Bins (0, 0.2], (0.2, 0.4], ...: a confidence of exactly 0.2 or 0.4 closes its bin.
    p = np.array([[0.2] * 5, [0.4, 0.15, 0.15, 0.15, 0.15]])
    rows = calibration_bins(np.array([0, 0]), p, bins=5)
    assert [(r["lower"], r["upper"], r["count"]) for r in rows] == [
        (0.0, pytest.approx(0.2), 1),
        (pytest.approx(0.2), pytest.approx(0.4), 1),
    ]
