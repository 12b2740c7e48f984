"""Box metrics: hand-computed cases and parity with a plain implementation of nnDetection's definitions."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bundles.retinaunet_template.scripts.evaluation import (
    FPPI_THRESHOLDS,
    EvaluationError,
    evaluate_boxes,
    evaluate_boxes_detailed,
    save_results,
)

CUBE = [0, 0, 0, 10, 10, 10]  # 1000 voxels


def _case(boxes, labels, scores=None):
    d = {"boxes": np.asarray(boxes, float).reshape(-1, 6), "labels": np.asarray(labels, int)}
    if scores is not None:
        d["scores"] = np.asarray(scores, float)
    return d


def _hand_case():
    """2 images, 3 GT (class 0), 4 predictions.

    image 0: GT g1 = CUBE, g2 = [20..30]^3; p1 (0.9) = g1 (IoU 1), p3 (0.7) far away (FP),
             p2 (0.6) = g2 stretched to z 20..50: IoU 1000/3000 = 1/3.
    image 1: GT g3 = CUBE; p4 (0.8) = CUBE stretched to z 0..15: IoU 1000/1500 = 2/3.
    """
    gt = [_case([CUBE, [20, 20, 20, 30, 30, 30]], [0, 0]), _case([CUBE], [0])]
    pred = [
        _case([CUBE, [20, 20, 20, 30, 30, 50], [50, 50, 50, 60, 60, 60]], [0, 0, 0], [0.9, 0.6, 0.7]),
        _case([[0, 0, 0, 10, 10, 15]], [0], [0.8]),
    ]
    return pred, gt


def test_hand_computed_ap_ar_froc():
    m = evaluate_boxes(*_hand_case(), classes=["a"])
    # Score order p1 (TP), p4 (TP), p3 (FP), p2 (TP iff IoU threshold <= 1/3); 3 GT.
    # IoU 0.1: recall 1/3, 2/3, 2/3, 1; precision 1, 1, 2/3, 3/4 -> monotone 1, 1, 3/4, 3/4.
    #   COCO 101 points r = 0.00..1.00: r <= 0.66 (67 points) -> first recall >= r has precision 1,
    #   r >= 0.67 (34 points) -> index 3, precision 3/4. AP = (67 + 34 * 0.75) / 101.
    assert m["AP_IoU_0.10_MaxDet_100"] == pytest.approx((67 + 34 * 0.75) / 101, abs=1e-9)
    assert m["a_AP_IoU_0.10_MaxDet_100"] == pytest.approx((67 + 34 * 0.75) / 101, abs=1e-9)
    # IoU 0.5: p2 is an FP, recall never exceeds 2/3 -> the 34 points above it get precision 0.
    assert m["AP_IoU_0.50_MaxDet_100"] == pytest.approx(67 / 101, abs=1e-9)
    # mAP over 0.10..0.50 step 0.05: p2 is a TP for 0.10, 0.15, 0.20, 0.25, 0.30 (5 thresholds), FP for 4.
    assert m["mAP_IoU_0.10_0.50_0.05_MaxDet_100"] == pytest.approx((5 * 92.5 + 4 * 67) / 9 / 101, abs=1e-9)
    # AR: at IoU 0.1 all 3 GT found; 1 detection per image keeps p1 and p4 only -> recall 2/3 everywhere.
    assert m["AR_IoU_0.10_MaxDet_100"] == pytest.approx(1.0)
    assert m["AR_IoU_0.50_MaxDet_100"] == pytest.approx(2 / 3)
    assert m["mAR_IoU_0.10_0.50_0.05_MaxDet_1"] == pytest.approx(2 / 3)
    assert m["mAR_IoU_0.10_0.50_0.05_MaxDet_100"] == pytest.approx((5 + 4 * 2 / 3) / 9)
    # FROC IoU 0.1, 2 images: points (FPPI, sens) (0,0) (0,1/3) (0,2/3) (0.5,2/3) (0.5,1).
    # At 1/8 and 1/4 -> 2/3; at 1/2 the threshold 0.6 gives 1 FP / 2 images with all 3 found -> 1; above -> 1.
    assert m["FROC_score_IoU_0.10"] == pytest.approx((2 * 2 / 3 + 5) / 7)
    assert m["FROC_sensitivity_FPPI_0.125_IoU_0.10"] == pytest.approx(2 / 3)
    assert m["FROC_sensitivity_FPPI_0.5_IoU_0.10"] == pytest.approx(1.0)
    assert m["FROC_score_IoU_0.50"] == pytest.approx(2 / 3)  # p2 is an FP: sensitivity stays 2/3
    assert m["a_FROC_score_IoU_0.10"] == m["mc_FROC_score_IoU_0.10"] == m["FROC_score_IoU_0.10"]


def test_key_names_as_nndetection():
    m = evaluate_boxes(*_hand_case(), classes=["a"])
    for t in ("0.10", "0.20", "0.30", "0.40", "0.50", "0.60", "0.70", "0.80", "0.90"):
        assert f"AP_IoU_{t}_MaxDet_100" in m and f"a_AP_IoU_{t}_MaxDet_100" in m
        assert f"FROC_score_IoU_{t}" in m and f"a_FROC_score_IoU_{t}" in m
    assert {"mAP_IoU_0.10_0.50_0.05_MaxDet_100", "a_mAP_IoU_0.10_0.50_0.05_MaxDet_100"} <= set(m)
    fast = evaluate_boxes(*_hand_case(), classes=["a"], fast=True, per_class=False)
    assert not any(k.startswith("a_") for k in fast)
    assert {k for k in fast if k.startswith("AP_")} == {"AP_IoU_0.10_MaxDet_100", "AP_IoU_0.50_MaxDet_100"}
    assert all(isinstance(v, float) for v in fast.values())


@pytest.mark.parametrize("dim", [2, 3])
def test_perfect_and_empty_predictions(dim):
    rng = np.random.default_rng(0)
    gt = []
    for _ in range(3):
        lo = rng.uniform(0, 50, (4, dim))
        gt.append({"boxes": np.c_[lo, lo + rng.uniform(2, 9, (4, dim))], "labels": rng.integers(0, 2, 4)})
    gt[1]["labels"][:] = [0, 1, 0, 1]  # both classes have GT
    perfect = [{**g, "scores": rng.uniform(0.1, 1, len(g["labels"]))} for g in gt]
    m = evaluate_boxes(perfect, gt, ["a", "b"])
    for key in (
        "AP_IoU_0.10_MaxDet_100",
        "AP_IoU_0.90_MaxDet_100",
        "mAP_IoU_0.10_0.50_0.05_MaxDet_100",
        "b_AP_IoU_0.50_MaxDet_100",
        "FROC_score_IoU_0.10",
        "FROC_score_IoU_0.90",
        "b_FROC_score_IoU_0.10",
    ):
        assert m[key] == pytest.approx(1.0), key
    empty = [{"boxes": np.zeros((0, 2 * dim)), "scores": [], "labels": []} for _ in gt]
    m = evaluate_boxes(empty, gt, ["a", "b"])
    for key in (
        "AP_IoU_0.10_MaxDet_100",
        "mAP_IoU_0.10_0.50_0.05_MaxDet_100",
        "FROC_score_IoU_0.10",
        "AR_IoU_0.10_MaxDet_100",
        "mc_FROC_score_IoU_0.10",
    ):
        assert m[key] == 0.0, key


def test_images_without_objects_count_in_fppi():
    gt = [_case([CUBE], [0])]
    pred = [_case([CUBE, [40, 40, 40, 50, 50, 50]], [0, 0], [0.5, 0.9])]  # FP scores above the TP
    one = evaluate_boxes(pred, gt, ["a"])
    # (0,0) (1 FP/img, 0) (1, 1): sensitivity 0 below FPPI 1, 1 from 1 on -> 4/7
    assert one["FROC_score_IoU_0.10"] == pytest.approx(4 / 7)
    empty_img = evaluate_boxes([*pred, _case([], [], [])], [*gt, _case([], [])], ["a"])
    # 2 images: the FP is 0.5 FP/img -> sensitivity 1 from FPPI 1/2 on -> 5/7; AP unchanged
    assert empty_img["FROC_score_IoU_0.10"] == pytest.approx(5 / 7)
    assert empty_img["AP_IoU_0.10_MaxDet_100"] == pytest.approx(one["AP_IoU_0.10_MaxDet_100"])
    fp_img = evaluate_boxes([*pred, _case([[0, 0, 0, 5, 5, 5]], [0], [0.95])], [*gt, _case([], [])], ["a"])
    # 2 FPs above the TP over 2 images -> 1 FP/img again -> 4/7
    assert fp_img["FROC_score_IoU_0.10"] == pytest.approx(4 / 7)


def test_class_without_gt_is_minus_one_like_nndetection():
    pred, gt = _hand_case()
    m = evaluate_boxes(pred, gt, ["a", "b"])
    assert m["b_AP_IoU_0.10_MaxDet_100"] == -1.0
    assert m["AP_IoU_0.10_MaxDet_100"] == pytest.approx(((67 + 34 * 0.75) / 101 - 1) / 2)
    assert m["AR_IoU_0.10_MaxDet_100"] == pytest.approx(1.0)  # AR leaves such classes out


def test_errors_name_the_case():
    pred, gt = _hand_case()
    with pytest.raises(EvaluationError, match="case 1"):
        evaluate_boxes(pred, [gt[0], _case([CUBE], [3])], ["a"])
    with pytest.raises(EvaluationError, match="entries"):
        evaluate_boxes(pred[:1], gt, ["a"])
    with pytest.raises(EvaluationError, match="x2 < x1"):
        evaluate_boxes([_case([[5, 5, 5, 1, 1, 1]], [0], [1.0])], [_case([CUBE], [0])], ["a"])


def test_save_results_json(tmp_path):
    m, curves = evaluate_boxes_detailed(*_hand_case(), classes=["a"], fast=True)
    path = save_results(m, tmp_path / "val_results", curves)
    assert path.name == "results_boxes.json"
    assert json.loads(path.read_text()) == pytest.approx(m)
    assert json.loads((tmp_path / "val_results" / "curves_boxes.json").read_text())["classes"] == ["a"]
    assert list((tmp_path / "val_results").glob(".*")) == []  # no temp files left


def test_curves_structure():
    _, c = evaluate_boxes_detailed(*_hand_case(), classes=["a"])
    assert sorted(c["scores"]["IoU_0.10"]["tp"]) == [0.6, 0.8, 0.9]
    assert list(c["scores"]["IoU_0.50"]["fp"]) == [0.7, 0.6] or sorted(c["scores"]["IoU_0.50"]["fp"]) == [
        0.6,
        0.7,
    ]
    pr = c["pr"]["a"]["IoU_0.10"]
    np.testing.assert_allclose(pr["recall"], [1 / 3, 2 / 3, 2 / 3, 1])
    np.testing.assert_allclose(pr["precision"], [1, 1, 0.75, 0.75])
    np.testing.assert_allclose(
        c["froc"]["IoU_0.10"]["sensitivity_at_thresholds"], [2 / 3, 2 / 3, 1, 1, 1, 1, 1]
    )
    assert c["gt"]["matched"]["IoU_0.50"].tolist() == [True, False, True]
    np.testing.assert_allclose(c["gt"]["volume"], [1000, 1000, 1000])


# ---------------------------------------------------------------------------------------------------------------
# Parity: a plain, loop-based implementation of nnDetection's COCO AP / FROC definitions.
# ---------------------------------------------------------------------------------------------------------------


def _plain_iou(a, b):
    d = len(a) // 2
    inter = np.prod([max(0.0, min(a[d + k], b[d + k]) - max(a[k], b[k])) for k in range(d)])
    union = (
        np.prod([a[d + k] - a[k] for k in range(d)]) + np.prod([b[d + k] - b[k] for k in range(d)]) - inter
    )
    return inter / union


def _plain_match(pred, gt, cls, t, max_det):
    """Greedy COCO matching in one image and class: list of (score, is_tp) for the top-scoring max_det
    predictions, each matched to the best-IoU still unmatched GT with IoU >= t; and the number of GT."""
    p_idx = [i for i in range(len(pred["labels"])) if pred["labels"][i] == cls]
    p_idx = sorted(p_idx, key=lambda i: -pred["scores"][i])[:max_det]
    g_idx = [j for j in range(len(gt["labels"])) if gt["labels"][j] == cls]
    used, out = set(), []
    for i in p_idx:
        best, best_iou = None, t
        for j in g_idx:
            iou = _plain_iou(pred["boxes"][i], gt["boxes"][j])
            if j not in used and iou >= best_iou:
                best, best_iou = j, iou
        if best is not None:
            used.add(best)
        out.append((pred["scores"][i], best is not None))
    return out, len(g_idx)


def _plain_ap_ar(preds, gts, cls, t, max_det):
    dets, num_gt = [], 0
    for p, g in zip(preds, gts, strict=True):
        d, n = _plain_match(p, g, cls, t, max_det)
        dets += d
        num_gt += n
    if num_gt == 0:
        return -1.0, -1.0
    dets.sort(key=lambda x: -x[0])
    tp = np.cumsum([x[1] for x in dets]).astype(np.float32)  # float32 sums as nnDetection/MONAI (see below)
    fp = np.cumsum([not x[1] for x in dets]).astype(np.float32)
    recall = tp / num_gt
    precision = list(tp / (tp + fp + np.spacing(1)))
    for i in range(len(precision) - 2, -1, -1):  # monotone from the right
        precision[i] = max(precision[i], precision[i + 1])
    points = np.linspace(0, 1, 101)
    sampled = [
        precision[k] if k < len(precision) else 0.0 for k in np.searchsorted(recall, points, side="left")
    ]
    return float(np.mean(sampled)), float(recall[-1]) if len(dets) else 0.0


def _plain_froc(preds, gts, t, num_classes, cls=None):
    dets, num_gt = [], 0
    for p, g in zip(preds, gts, strict=True):
        for c in range(num_classes) if cls is None else [cls]:
            d, n = _plain_match(p, g, c, t, 100)
            dets += d
            num_gt += n
    if num_gt == 0:
        return 0.0
    dets.sort(key=lambda x: -x[0])
    fppi, sens, tp, fp = [0.0], [0.0], 0, 0
    for k, (score, hit) in enumerate(dets):
        tp, fp = tp + hit, fp + (not hit)
        if k == len(dets) - 1 or dets[k + 1][0] != score:  # one point per distinct score
            fppi.append(fp / len(preds))
            sens.append(tp / num_gt)
    return float(np.mean(np.interp(FPPI_THRESHOLDS, fppi, sens)))


def _random_cases(rng, dim, n_images, num_classes):
    preds, gts = [], []
    for i in range(n_images):
        n_gt = int(rng.integers(0 if i % 4 == 3 else 1, 6))
        lo = rng.uniform(0, 40, (n_gt, dim))
        gt_boxes = np.c_[lo, lo + rng.uniform(5, 14, (n_gt, dim))]
        gt_labels = rng.integers(0, num_classes, n_gt)
        # predictions: jittered copies of some GT (various IoUs) plus random boxes
        src = gt_boxes[rng.random(n_gt) < 0.8]
        jit = src + rng.normal(0, 0.8, src.shape)
        jit[:, dim:] = np.maximum(jit[:, dim:], jit[:, :dim] + 0.5)
        n_rand = int(rng.integers(0, 8))
        lo = rng.uniform(0, 40, (n_rand, dim))
        boxes = np.r_[jit, np.c_[lo, lo + rng.uniform(2, 12, (n_rand, dim))]]
        labels = np.r_[gt_labels[: len(src)] if len(src) else [], rng.integers(0, num_classes, n_rand)]
        labels = np.where(rng.random(len(labels)) < 0.15, rng.integers(0, num_classes, len(labels)), labels)
        preds.append({"boxes": boxes, "scores": rng.random(len(boxes)), "labels": labels.astype(int)})
        gts.append({"boxes": gt_boxes, "labels": gt_labels})
    for c in range(
        num_classes
    ):  # every class has at least one GT (a class without GT is AP -1, tested above)
        gts[c]["boxes"] = np.r_[gts[c]["boxes"], [[1.0] * dim + [6.0] * dim]]
        gts[c]["labels"] = np.r_[gts[c]["labels"], [c]]
    return preds, gts


@pytest.mark.parametrize(
    "dim,seed,num_classes,tied",
    [(3, 1, 3, False), (2, 2, 2, False), (3, 3, 1, False), (3, 4, 2, True), (2, 5, 3, True)],
)
def test_metric_parity_with_plain_definition(dim, seed, num_classes, tied):
    """Our results equal the plain definitions to 1e-6.

    nnDetection (and MONAI's copy of it) accumulates TP/FP in float32, so a recall like 9/10 falls just below
    the COCO recall point 0.90 (in float64 it does not): the plain version does the same, or AP could differ by
    up to 1/101 on such data.
    ``tied``: scores rounded to 0.1, so many detections share a score (FROC takes one point per distinct score).
    """
    rng = np.random.default_rng(seed)
    preds, gts = _random_cases(rng, dim, 12, num_classes)
    if tied:
        for p in preds:
            p["scores"] = np.round(p["scores"], 1)
    classes = [f"c{k}" for k in range(num_classes)]
    m = evaluate_boxes(preds, gts, classes, iou_thresholds=(0.1, 0.3, 0.5), max_detections=(1, 5, 100))
    range_t = np.linspace(0.1, 0.5, 9)
    checked = 0
    for t in (0.1, 0.3, 0.5):
        tag = f"{t:.2f}"
        per = [_plain_ap_ar(preds, gts, c, t, 100) for c in range(num_classes)]
        assert m[f"AP_IoU_{tag}_MaxDet_100"] == pytest.approx(np.mean([a for a, _ in per]), abs=1e-6)
        assert m[f"AR_IoU_{tag}_MaxDet_100"] == pytest.approx(np.mean([r for _, r in per]), abs=1e-6)
        assert m[f"FROC_score_IoU_{tag}"] == pytest.approx(_plain_froc(preds, gts, t, num_classes), abs=1e-6)
        for c, name in enumerate(classes):
            assert m[f"{name}_AP_IoU_{tag}_MaxDet_100"] == pytest.approx(per[c][0], abs=1e-6)
            assert m[f"{name}_FROC_score_IoU_{tag}"] == pytest.approx(
                _plain_froc(preds, gts, t, num_classes, cls=c), abs=1e-6
            )
            checked += 2
    maps = [[_plain_ap_ar(preds, gts, c, t, 100)[0] for t in range_t] for c in range(num_classes)]
    assert m["mAP_IoU_0.10_0.50_0.05_MaxDet_100"] == pytest.approx(np.mean(maps), abs=1e-6)
    for c, name in enumerate(classes):
        assert m[f"{name}_mAP_IoU_0.10_0.50_0.05_MaxDet_100"] == pytest.approx(np.mean(maps[c]), abs=1e-6)
    for md in (1, 5):
        mar = np.mean([[_plain_ap_ar(preds, gts, c, t, md)[1] for t in range_t] for c in range(num_classes)])
        assert m[f"mAR_IoU_0.10_0.50_0.05_MaxDet_{md}"] == pytest.approx(mar, abs=1e-6)
    # the data are not trivial: neither perfect nor empty
    assert 0.05 < m["AP_IoU_0.10_MaxDet_100"] < 0.95 and 0.05 < m["FROC_score_IoU_0.50"] < 0.95
    assert checked == 6 * num_classes


def test_float32_recall_quirk_as_nndetection():
    """10 GT, 9 found with precision 1: exact AP would be 91/101 (recall points 0.00..0.90), but nnDetection's
    float32 recall 9/10 = 0.8999999762 < 0.90, so the point 0.90 gets precision 0: AP = 90/101. We keep it."""
    gt = [_case([CUBE], [0]) for _ in range(10)]
    pred = [_case([CUBE], [0], [0.5]) for _ in range(9)] + [_case([], [], [])]
    assert evaluate_boxes(pred, gt, ["a"], fast=True)["AP_IoU_0.10_MaxDet_100"] == pytest.approx(90 / 101)
