"""Patch dataset, foreground oversampling, padding, boxes from the augmented map, loaders."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from bundles.retinaunet_template.scripts.augment import DetectionAugmentation
from bundles.retinaunet_template.scripts.data import (
    CENTRE,
    FOREGROUND,
    FOREGROUND_CENTRE,
    RANDOM,
    OversamplingBatchSampler,
    PatchDataset,
    boxes_from_instance_map,
    crop_padded,
    make_train_loader,
    make_val_loader,
    npy_shape,
)

PATCH = (16, 16, 16)


def write_case(folder, case, shape, objects, channels=1, seed=0):
    """A case in the preprocessed layout; ``objects`` = [(lo, hi, class)] half-open voxel boxes."""
    rng = np.random.default_rng(seed)
    img = rng.normal(size=(channels, *shape)).astype(np.float32)
    seg = np.zeros(shape, dtype=np.int32)
    seg[(slice(0, 1),) * len(shape)] = -1  # a corner outside the body
    boxes, classes, ids = [], [], []
    for i, (lo, hi, cls) in enumerate(objects, start=1):
        seg[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))] = i
        img[(slice(None), *(slice(a, b) for a, b in zip(lo, hi, strict=True)))] += 3.0
        boxes.append(list(lo) + list(hi))
        classes.append(cls)
        ids.append(i)
    np.save(folder / f"{case}.npy", img)
    np.save(folder / f"{case}_seg.npy", seg[None])
    (folder / f"{case}.json").write_text(
        json.dumps({"boxes": boxes, "classes": classes, "instance_ids": ids})
    )


@pytest.fixture()
def prep3d(tmp_path):
    d = tmp_path / "D3V001_3d" / "imagesTr"
    d.mkdir(parents=True)
    write_case(d, "c0", (40, 36, 30), [((2, 3, 4), (8, 9, 10), 0), ((25, 20, 15), (35, 30, 25), 1)], seed=0)
    write_case(d, "c1", (12, 40, 20), [((3, 30, 5), (9, 37, 12), 1)], seed=1)  # smaller than the patch in x
    write_case(d, "c2", (30, 30, 30), [], seed=2)  # no objects
    return d.parent


def test_npy_shape_reads_header_only(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((2, 5, 7), np.float32))
    assert npy_shape(tmp_path / "a.npy") == (2, 5, 7)


def test_crop_padded_at_borders():
    arr = np.arange(2 * 5 * 6).reshape(2, 5, 6)
    out = crop_padded(arr, (-2, 3), (4, 5), -1)
    assert out.shape == (2, 4, 5)
    np.testing.assert_array_equal(out[:, :2], -1)  # before the start of axis 0
    np.testing.assert_array_equal(out[:, :, 3:], -1)  # past the end of axis 1
    np.testing.assert_array_equal(out[:, 2:, :3], arr[:, 0:2, 3:6])
    assert (crop_padded(arr, (10, 10), (2, 2), 0) == 0).all()  # fully outside
    small = crop_padded(arr.astype(np.uint8), (-1, 0), (3, 3), -1, np.int32)
    assert small.dtype == np.int32 and (small[:, 0] == -1).all()


def test_boxes_from_instance_map_half_open():
    seg = np.zeros((10, 12), np.int32)
    seg[2:5, 3:9] = 2
    seg[7, 0] = 1
    seg[0, 0] = -1
    boxes, labels = boxes_from_instance_map(seg, {1: 0, 2: 1})
    np.testing.assert_array_equal(boxes, [[7, 0, 8, 1], [2, 3, 5, 9]])
    np.testing.assert_array_equal(labels, [0, 1])
    assert boxes.dtype == np.float32 and labels.dtype == np.int64
    assert boxes_from_instance_map(np.zeros((4, 4), np.int32), {})[0].shape == (0, 4)


def test_dataset_uses_memmaps_and_pads_outside(prep3d):
    ds = PatchDataset(prep3d / "imagesTr", ["c0", "c1", "c2"], PATCH)
    assert ds.instances == [(0, 0), (0, 1), (1, 0)]
    assert ds._arrays == {}  # nothing opened before use
    s = ds[(CENTRE, 1, -1, 0)]  # c1 is 12 voxels along x, the patch 16: 2 padded slices on each side
    img, seg = ds.arrays(1)
    assert isinstance(img, np.memmap) and isinstance(seg, np.memmap)
    assert s["image"].shape == (1, *PATCH) and s["image"].dtype == torch.float32
    assert s["seg"].shape == (1, *PATCH) and s["seg"].dtype == torch.int32
    assert (s["image"][:, :2] == 0).all() and (s["image"][:, -2:] == 0).all()
    assert s["seg"].min() >= 0  # -1 (outside) removed at the end
    assert not torch.equal(s["image"][:, 2], torch.zeros_like(s["image"][:, 2]))


def test_foreground_crops_contain_the_whole_instance(prep3d):
    ds = PatchDataset(prep3d / "imagesTr", ["c0", "c1", "c2"], PATCH)
    for seed in range(40):
        for c, k in ds.instances:
            s = ds[(FOREGROUND, c, k, seed)]
            b = ds.boxes[c][k]
            size = b[3:] - b[:3]
            whole = [box for box in s["boxes"].numpy() if np.array_equal(box[3:] - box[:3], size)]
            assert whole, f"instance {c}/{k} clipped with seed {seed}: {s['boxes']}"
            assert (whole[0][:3] >= 0).all() and (whole[0][3:] <= PATCH).all()


def test_foreground_crops_stay_inside_the_scan(prep3d):
    # c0's first object touches the low corner (2..8, 3..9, 4..10) and its second the high end: unclipped
    # offsets would start up to 14 voxels before 0 or end past the scan. As nnDetection's OffsetFGCrop, the
    # start stays in [0, shape - patch] (c1's x axis, 12 < 16, is covered whole: start in [-4, 0]).
    ds = PatchDataset(prep3d / "imagesTr", ["c0", "c1", "c2"], PATCH)
    rng = np.random.default_rng(0)
    for c, k in ds.instances:
        shape = np.asarray(ds.shapes[c])
        lo, hi = np.minimum(0, shape - 16), np.maximum(0, shape - 16)
        for mode in (FOREGROUND, FOREGROUND_CENTRE):
            starts = np.array([ds.patch_start((mode, c, k, 0), rng) for _ in range(100)])
            assert (starts >= lo).all() and (starts <= hi).all(), (c, k, mode, starts.min(0), starts.max(0))
    starts = np.array([ds.patch_start((FOREGROUND, 0, 0, 0), rng) for _ in range(100)])
    assert (starts.min(0) == 0).all()  # the clipped offsets do reach the border


def test_random_crop_stays_inside_when_possible(prep3d):
    ds = PatchDataset(prep3d / "imagesTr", ["c2"], PATCH)
    rng = np.random.default_rng(0)
    starts = np.array([ds.patch_start((RANDOM, 0, -1, 0), rng) for _ in range(200)])
    assert starts.min() == 0 and starts.max() == 30 - 16


def test_oversampling_batch_layout():
    sampler = OversamplingBatchSampler(3, [(0, 0), (0, 1), (1, 0)], batch_size=4, num_batches=50, seed=3)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 50
    for b in batches:
        assert [r[0] for r in b] == [RANDOM, RANDOM, FOREGROUND, FOREGROUND]
    picked = [(r[1], r[2]) for b in batches for r in b if r[0] == FOREGROUND]
    assert set(picked) == {(0, 0), (0, 1), (1, 0)}  # uniform over instances, not cases
    sampler.set_epoch(0)
    assert list(sampler) == batches and list(sampler) != batches  # epoch 0 again, then epoch 1
    assert [r[0] for r in next(iter(OversamplingBatchSampler(3, [], 4, 1)))] == [RANDOM] * 4


def test_train_batches_hold_whole_instances(prep3d):
    loader = make_train_loader(prep3d, ["c0", "c1", "c2"], PATCH, batch_size=4, num_batches=6, num_workers=0)
    for batch in loader:
        assert batch["image"].shape == (4, 1, *PATCH) and batch["seg"].shape == (4, 1, *PATCH)
        whole = 0
        for t, seg in zip(batch["targets"], batch["seg"], strict=True):
            assert t["boxes"].shape[1] == 6 and t["labels"].dtype == torch.int64
            # boxes were recomputed from the augmented map: they match it exactly
            ref_boxes, _ = boxes_from_instance_map(seg[0].numpy(), {1: 0, 2: 1})
            np.testing.assert_array_equal(t["boxes"].numpy(), ref_boxes)
            inside = (t["boxes"][:, :3] > 0).all(1) & (t["boxes"][:, 3:] < torch.tensor(PATCH)).all(1)
            whole += int(inside.any())
        # two foreground samples per batch; rotation/scaling (p 0.2 each) may still move one to the border
        assert whole >= 1
    n_fg = 0
    aug_off = DetectionAugmentation(dim=3, p_rotation=0, p_scale=0)
    loader = make_train_loader(prep3d, ["c0", "c1"], PATCH, 4, num_batches=5, num_workers=0, augment=aug_off)
    for batch in loader:
        n_whole = 0
        for t in batch["targets"]:
            b = t["boxes"]
            sizes = b[:, 3:] - b[:, :3]
            gt = {(6.0, 6.0, 6.0), (10.0, 10.0, 10.0), (6.0, 7.0, 7.0)}
            n_whole += int(any(tuple(s.tolist()) in gt for s in sizes))
        assert n_whole >= 2
        n_fg += n_whole
    assert n_fg >= 10


def test_loader_with_workers_is_deterministic(prep3d):
    def run(workers, seed):
        loader = make_train_loader(
            prep3d, ["c0", "c1", "c2"], PATCH, 2, num_batches=4, num_workers=workers, seed=seed
        )
        return [(b["image"].clone(), b["seg"].clone(), [t["boxes"] for t in b["targets"]]) for b in loader]

    a, b, c = run(2, 7), run(2, 7), run(0, 7)
    for x, y, z in zip(a, b, c, strict=True):
        assert torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) and torch.equal(x[0], z[0])
        assert all(torch.equal(p, q) for p, q in zip(x[2], y[2], strict=True))
    d = run(0, 8)
    assert not all(torch.equal(x[0], w[0]) for x, w in zip(a, d, strict=True))


def test_val_loader_is_deterministic_and_covers_instances(prep3d):
    loader = make_val_loader(prep3d, ["c0", "c1", "c2"], PATCH, batch_size=4, num_workers=0)
    first = list(loader)
    assert len(first) == 2  # 3 centre crops + 3 instance crops
    second = list(loader)
    for x, y in zip(first, second, strict=True):
        assert torch.equal(x["image"], y["image"])
    n_boxes = sum(len(t["boxes"]) for b in first for t in b["targets"])
    assert n_boxes >= 3


def test_missing_file_error_names_it(prep3d):
    (prep3d / "imagesTr" / "c1.json").unlink()
    with pytest.raises(FileNotFoundError, match="c1.json"):
        PatchDataset(prep3d / "imagesTr", ["c0", "c1"], PATCH)
    with pytest.raises(ValueError, match="spatial axes"):
        PatchDataset(prep3d / "imagesTr", ["c0"], (16, 16))


def test_2d_dataset(tmp_path):
    d = tmp_path / "imagesTr"
    d.mkdir()
    write_case(d, "a", (50, 40), [((10, 10), (20, 14), 0)], channels=2)
    loader = make_train_loader(tmp_path, ["a"], (32, 32), batch_size=2, num_batches=3, num_workers=0)
    for b in loader:
        assert b["image"].shape == (2, 2, 32, 32)
        assert b["targets"][1]["boxes"].shape[1] == 4 and len(b["targets"][1]["boxes"]) == 1
