"""Training / validation patches from the preprocessed arrays (sampling as nnDetection's ``DataLoader3DOffset``).

Input layout (``preprocessed/<plan_id>/imagesTr/``), per case:

* ``<case>.npy``: float32 image [C, *spatial] (2D or 3D), opened with ``np.load(mmap_mode="r")``;
* ``<case>_seg.npy``: integer instance map [*spatial] or [1, *spatial] (0 background, -1 outside the
  body, 1..N instances);
* ``<case>.json``: ``boxes`` (StandardMode half-open voxel boxes of this array: x1,y1,(z1),x2,y2,(z2)),
  ``classes`` (0-based class per box), ``instance_ids`` (instance id per box).

Sampling is decided in the main process by a batch sampler that emits one *request* per sample
``(mode, case index, instance index, seed)``; the dataset turns a request into a patch in a worker. All
randomness of a sample (crop offset, augmentation) comes from its seed, so a run is reproducible with the
same seed whatever the number of workers. We do not use MONAI's ``RandCropBoxByPosNegLabeld``: it builds a
mask per box over the whole volume on every call; crops here come from the precomputed boxes.

Output sample: ``image`` float32 [C, *patch], ``seg`` int32 [1, *patch] (instance ids, 0 background),
``boxes`` float32 [N, 2*dim] StandardMode half-open boxes in patch voxel coordinates, recomputed from the
final (augmented) instance map, ``labels`` int64 [N] (0-based classes), ``case_id``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from scipy.ndimage import find_objects
from torch.utils.data import DataLoader, Dataset, Sampler

from planner.io import load_json
from planner.paths import local_processes, num_threads

from .augment import DetectionAugmentation
from .distributed import global_batch

logger = logging.getLogger(__name__)

RANDOM, FOREGROUND, CENTRE, FOREGROUND_CENTRE = "random", "fg", "centre", "fg_centre"
Request = tuple[str, int, int, int]  # (mode, case index, instance index or -1, seed)


def npy_shape(path: Path) -> tuple[int, ...]:
    """Shape stored in a .npy header, without reading or mapping the data."""
    with open(path, "rb") as f:
        major, _ = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, _, _ = read(f)
    return tuple(shape)


def crop_padded(
    array: np.ndarray,
    start: Sequence[int],
    size: Sequence[int],
    pad_value: float,
    dtype: np.dtype | None = None,
) -> np.ndarray:
    """Copy ``array[:, start:start+size]`` (leading channel axis kept) as ``dtype`` (default: the array's),
    padding with ``pad_value`` outside the array."""
    spatial = array.shape[1:]
    out = np.full((array.shape[0], *size), pad_value, dtype=dtype or array.dtype)
    src, dst = [slice(None)], [slice(None)]
    for s, n, dim in zip(start, size, spatial, strict=True):
        lo, hi = max(s, 0), min(s + n, dim)
        if hi <= lo:
            return out
        src.append(slice(lo, hi))
        dst.append(slice(lo - s, hi - s))
    out[tuple(dst)] = array[tuple(src)]
    return out


def boxes_from_instance_map(seg: np.ndarray, id_to_class: dict[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Boxes of the instances present in ``seg``.

    Args:
        seg: [*spatial] integer instance map (values <= 0 ignored).
        id_to_class: instance id -> 0-based class; ids not listed are skipped.

    Returns:
        boxes [N, 2*dim] float32 (StandardMode, half-open voxel boxes of ``seg``), labels [N] int64,
        ordered by instance id.
    """
    dim = seg.ndim
    objects = find_objects(np.where(seg > 0, seg, 0).astype(np.int32, copy=False)) if seg.size else []
    boxes, labels = [], []
    for idx, sl in enumerate(objects, start=1):
        if sl is None:
            continue
        if idx not in id_to_class:
            logger.debug("instance %d has no class in the case json: skipped", idx)
            continue
        boxes.append([s.start for s in sl] + [s.stop for s in sl])
        labels.append(id_to_class[idx])
    return (
        np.asarray(boxes, dtype=np.float32).reshape(-1, 2 * dim),
        np.asarray(labels, dtype=np.int64),
    )


class PatchDataset(Dataset):
    """Map-style dataset whose items are sampler requests (see module docstring).

    Args:
        images_dir: ``preprocessed/<plan_id>/imagesTr``.
        case_ids: cases to use.
        patch_size: final spatial patch size (2 or 3 values, array axis order).
        augmentation: applied to every sample; ``None`` for plain crops (validation).
    """

    def __init__(
        self,
        images_dir: str | os.PathLike,
        case_ids: Sequence[str],
        patch_size: Sequence[int],
        augmentation: DetectionAugmentation | None = None,
    ):
        self.images_dir = Path(images_dir)
        self.case_ids = list(case_ids)
        self.patch_size = tuple(int(p) for p in patch_size)
        self.dim = len(self.patch_size)
        self.augmentation = augmentation
        if not self.case_ids:
            raise ValueError(f"{self.images_dir}: no cases given to the data loader")
        self.shapes: list[tuple[int, ...]] = []
        self.boxes: list[np.ndarray] = []
        self.classes: list[np.ndarray] = []
        self.id_to_class: list[dict[int, int]] = []
        for case in self.case_ids:
            self._index_case(case)
        #: every instance of the dataset as (case index, box index): foreground draws are uniform over these
        self.instances = [(c, k) for c, b in enumerate(self.boxes) for k in range(len(b))]
        self._arrays: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def _index_case(self, case: str) -> None:
        img, seg, meta = (self.images_dir / f"{case}{s}" for s in (".npy", "_seg.npy", ".json"))
        for f in (img, seg, meta):
            if not f.is_file():
                raise FileNotFoundError(
                    f"{f}: missing. Run `nndet_prep` (and `nndet_unpack`) for this plan again."
                )
        shape = npy_shape(img)
        if len(shape) != self.dim + 1:
            raise ValueError(
                f"{img}: shape {shape} is not [C, *spatial] with {self.dim} spatial axes (patch)"
            )
        info = load_json(meta)
        boxes = np.asarray(info.get("boxes", []), dtype=np.float64).reshape(-1, 2 * self.dim)
        classes = np.asarray(info.get("classes", []), dtype=np.int64)
        ids = [int(i) for i in info.get("instance_ids", [])]
        if not (len(boxes) == len(classes) == len(ids)):
            raise ValueError(
                f"{meta}: 'boxes', 'classes' and 'instance_ids' differ in length; re-run nndet_prep"
            )
        self.shapes.append(shape[1:])
        self.boxes.append(boxes)
        self.classes.append(classes)
        self.id_to_class.append(dict(zip(ids, classes.tolist(), strict=True)))

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_arrays"] = {}  # memmaps are reopened lazily in each process
        return state

    def arrays(self, case_index: int) -> tuple[np.ndarray, np.ndarray]:
        """Memory-mapped (image [C, *spatial], seg [1, *spatial]) of a case, opened on first use."""
        if case_index not in self._arrays:
            case = self.case_ids[case_index]
            img = np.load(self.images_dir / f"{case}.npy", mmap_mode="r")
            seg = np.load(self.images_dir / f"{case}_seg.npy", mmap_mode="r")
            if seg.ndim == self.dim:
                seg = seg[None]
            self._arrays[case_index] = (img, seg)
        return self._arrays[case_index]

    def __len__(self) -> int:
        return len(self.case_ids)

    def patch_start(self, request: Request, rng: np.random.Generator) -> np.ndarray:
        """Start (voxel, array axes) of the final patch for a request.

        The patch stays inside the scan along every axis where the scan is at least as long as the patch
        (start in ``[0, shape - patch]``); along a shorter axis it covers the whole scan (start in
        ``[shape - patch, 0]``, padded). Foreground starts are clipped to that range as nnDetection's
        ``OffsetFGCrop`` does, so an object near the border does not bring a patch of padding with it;
        clipping keeps an object that fits the patch wholly inside it.
        """
        mode, c, k, _ = request
        shape, p = np.asarray(self.shapes[c]), np.asarray(self.patch_size)
        lo, hi = np.minimum(0, shape - p), np.maximum(0, shape - p)
        if mode == RANDOM:
            return np.array([rng.integers(a, b + 1) for a, b in zip(lo, hi, strict=True)])
        if mode == CENTRE:
            return (shape - p) // 2
        box = self.boxes[c][k]
        b_lo, b_hi = np.floor(box[: self.dim]).astype(int), np.ceil(box[self.dim :]).astype(int)
        if mode == FOREGROUND_CENTRE:
            return np.clip((b_lo + b_hi) // 2 - p // 2, lo, hi)
        start = np.empty(self.dim, dtype=int)
        for a in range(self.dim):
            if b_hi[a] - b_lo[a] <= p[a]:  # whole object inside, random offset
                start[a] = rng.integers(b_hi[a] - p[a], b_lo[a] + 1)
            else:  # bigger than the patch: random centre inside the box
                start[a] = rng.integers(b_lo[a], b_hi[a]) - p[a] // 2
        return np.clip(start, lo, hi)

    def __getitem__(self, request: Request) -> dict:
        mode, c, _, seed = request
        rng = np.random.default_rng(seed)
        start = self.patch_start(request, rng)
        aug = self.augmentation
        matrix = aug.sample_spatial(rng) if aug is not None else None
        size = aug.input_size(self.patch_size, matrix) if aug is not None else self.patch_size
        in_start = start - (np.asarray(size) - np.asarray(self.patch_size)) // 2
        img_mm, seg_mm = self.arrays(c)
        image = crop_padded(img_mm, in_start, size, 0.0, np.float32)
        seg = crop_padded(seg_mm, in_start, size, -1, np.int32)  # int32: -1 padding even for uint8 maps
        if aug is not None:
            image, seg = aug(image, seg, self.patch_size, rng, matrix)
        else:
            seg = np.where(seg < 0, 0, seg)
        boxes, labels = boxes_from_instance_map(seg[0], self.id_to_class[c])
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image)),
            "seg": torch.from_numpy(np.ascontiguousarray(seg, dtype=np.int32)),
            "boxes": torch.from_numpy(boxes),
            "labels": torch.from_numpy(labels),
            "case_id": self.case_ids[c],
        }


class OversamplingBatchSampler(Sampler):
    """Batches of requests with nnDetection's foreground oversampling (``DataLoader3DOffset``).

    In every batch the first ``round(B * (1 - oversample_foreground))`` samples are a random case with a
    random crop, the rest a random instance drawn uniformly over all instances of the dataset, placed
    wholly inside the patch at a random offset. Epoch ``e`` is drawn from ``seed`` and ``e`` only, so
    :meth:`set_epoch` (e.g. on resume) reproduces any epoch; each ``__iter__`` advances the epoch.

    Under DDP every rank draws the same global batches and yields its share, samples ``rank::world_size``
    (strided, so each rank gets random and foreground patches alike); the union over ranks is the
    single-process batch. ``batch_size`` is the global batch (rounded up to a multiple of ``world_size``).
    """

    # ours, not torch's DistributedSampler: that one shards a fixed index list per epoch, while these batches are
    # drawn (with replacement, foreground-oversampled) from (seed, epoch) and must be the same for any world size

    def __init__(
        self,
        num_cases: int,
        instances: Sequence[tuple[int, int]],
        batch_size: int,
        num_batches: int,
        oversample_foreground: float = 0.5,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.num_cases, self.instances = num_cases, list(instances)
        self.rank, self.world_size = int(rank), int(world_size)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.batch_size = global_batch(batch_size, self.world_size)  # the plan's, grown to a multiple of the ranks
        if self.batch_size != int(batch_size):
            logger.warning("batch size %d does not split over %d processes: global batch %d (%d per process)",
                           int(batch_size), self.world_size, self.batch_size, self.batch_size // self.world_size)
        self.num_batches = int(num_batches)
        self.oversample_foreground, self.seed, self.epoch = oversample_foreground, int(seed), 0
        if not self.instances and oversample_foreground > 0:
            logger.warning("no instances in the training cases: every patch is a random crop")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[list[Request]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        self.epoch += 1
        n_random = round(self.batch_size * (1 - self.oversample_foreground))
        for _ in range(self.num_batches):
            batch = []
            for b in range(self.batch_size):
                seed = int(rng.integers(2**63 - 1))
                if b < n_random or not self.instances:
                    batch.append((RANDOM, int(rng.integers(self.num_cases)), -1, seed))
                else:
                    c, k = self.instances[int(rng.integers(len(self.instances)))]
                    batch.append((FOREGROUND, c, k, seed))
            yield batch[self.rank :: self.world_size]


class FixedBatchSampler(Sampler):
    """Deterministic validation requests: a centre crop per case, then a crop centred on each instance.

    Under DDP rank ``r`` of ``world_size`` takes requests ``r::world_size`` of that list.
    """

    def __init__(self, num_cases: int, instances: Sequence[tuple[int, int]], batch_size: int, rank: int = 0,
                 world_size: int = 1):
        reqs = [(CENTRE, c, -1, 0) for c in range(num_cases)] + [
            (FOREGROUND_CENTRE, c, k, 0) for c, k in instances
        ]
        if len(reqs) < world_size:
            raise ValueError(f"{len(reqs)} validation patches cannot be shared by {world_size} processes; "
                             "train with fewer processes (--gpus) or give the fold more validation cases")
        #: this rank's requests are ``rank::world_size`` of the list (``PatchDetectionMetrics`` re-interleaves them)
        reqs = reqs[rank::world_size]
        self.batches = [reqs[i : i + batch_size] for i in range(0, len(reqs), batch_size)]

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[list[Request]]:
        return iter([list(b) for b in self.batches])


def collate_detection(samples: list[dict]) -> dict:
    """Stack patches: ``image`` [B, C, *patch], ``seg`` [B, 1, *patch], ``targets`` list of
    ``{"boxes": [N_i, 2*dim] float32, "labels": [N_i] int64}``, ``case_id`` list of str."""
    return {
        "image": torch.stack([s["image"] for s in samples]),
        "seg": torch.stack([s["seg"] for s in samples]),
        "targets": [{"boxes": s["boxes"], "labels": s["labels"]} for s in samples],
        "case_id": [s["case_id"] for s in samples],
    }


def _worker_init(worker_id: int) -> None:
    torch.set_num_threads(1)  # workers are processes: no intra-op threads fighting over the cores
    np.random.seed(torch.initial_seed() % 2**32)  # only for third-party code; our draws use request seeds


def _loader(dataset: PatchDataset, sampler: Sampler, num_workers: int | None, seed: int) -> DataLoader:
    # det_num_threads is the machine's budget: torchrun's processes on one machine share it
    workers = num_threads() // local_processes() if num_workers is None else int(num_workers)
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate_detection,
        num_workers=workers,
        persistent_workers=workers > 0,
        prefetch_factor=2 if workers > 0 else None,
        pin_memory=torch.cuda.is_available(),
        worker_init_fn=_worker_init if workers > 0 else None,
        generator=torch.Generator().manual_seed(seed),
    )


def _images_dir(preprocessed_dir: str | os.PathLike) -> Path:
    d = Path(preprocessed_dir)
    return d / "imagesTr" if (d / "imagesTr").is_dir() else d


def make_train_loader(
    preprocessed_dir: str | os.PathLike,
    case_ids: Sequence[str],
    patch_size: Sequence[int],
    batch_size: int,
    num_batches: int = 2500,
    num_workers: int | None = None,
    oversample_foreground: float = 0.5,
    augment: DetectionAugmentation | bool = True,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
) -> DataLoader:
    """Training loader: ``num_batches`` oversampled, augmented batches per epoch (see :func:`collate_detection`).

    Args:
        preprocessed_dir: ``preprocessed/<plan_id>`` (or its ``imagesTr``).
        case_ids: training cases of the fold.
        patch_size: final patch size; crops are read at the augmentation's footprint size around it.
        batch_size: samples per batch.
        num_batches: batches per epoch (``len(loader)``).
        num_workers: worker processes; ``None`` -> ``det_num_threads``. Workers are persistent.
        oversample_foreground: share of each batch centred on a whole instance (nnDetection: 0.5).
        augment: an augmentation object, ``True`` for nnDetection's "base_more" defaults, ``False`` for none.
        seed: the run's seed; the same seed gives the same batches (call ``loader.batch_sampler.set_epoch``
            when resuming at a later epoch).
        rank, world_size: this process's share of each global batch under DDP (see ``OversamplingBatchSampler``).
    """
    if augment is True:
        augment = DetectionAugmentation(dim=len(patch_size))
    ds = PatchDataset(_images_dir(preprocessed_dir), case_ids, patch_size, augment or None)
    sampler = OversamplingBatchSampler(
        len(ds.case_ids), ds.instances, batch_size, num_batches, oversample_foreground, seed, rank, world_size
    )
    return _loader(ds, sampler, num_workers, seed)


def make_val_loader(
    preprocessed_dir: str | os.PathLike,
    case_ids: Sequence[str],
    patch_size: Sequence[int],
    batch_size: int,
    num_workers: int | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> DataLoader:
    """Deterministic patch validation: a centre crop of each case, then a crop centred on each instance
    (no augmentation; ``ceil((cases + instances) / batch_size)`` batches; under DDP this rank's share)."""
    ds = PatchDataset(_images_dir(preprocessed_dir), case_ids, patch_size, None)
    sampler = FixedBatchSampler(len(ds.case_ids), ds.instances, batch_size, rank, world_size)
    workers = num_threads() // local_processes() if num_workers is None else int(num_workers)
    return _loader(ds, sampler, min(workers, len(sampler)), seed=0)
