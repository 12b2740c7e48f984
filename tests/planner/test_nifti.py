"""NIfTI reading: ``read_nifti`` gives what ``nib.load`` gives, for every file flavour we may meet."""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest

from planner.dataset import DatasetError
from planner.nifti import load_nifti, read_nifti


def _same(path) -> None:
    ref, got = nib.load(str(path)), read_nifti(path)
    a, b = np.asanyarray(ref.dataobj), np.asanyarray(got.dataobj)
    assert type(got) is type(ref) and a.dtype == b.dtype and a.flags.f_contiguous == b.flags.f_contiguous
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(ref.affine, got.affine)
    assert ref.header.get_zooms() == got.header.get_zooms()


@pytest.mark.parametrize("cls", [nib.Nifti1Image, nib.Nifti2Image])
@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
def test_read_nifti_equals_nib_load(tmp_path, cls, suffix):
    rng = np.random.default_rng(0)
    affine = np.diag([0.7, 0.8, 3.0, 1.0])
    arrays = {"f": rng.random((5, 6, 7)).astype(np.float32), "i": rng.integers(-1000, 900, (4, 3, 2)).astype(np.int16)}
    for name, arr in arrays.items():
        path = tmp_path / f"{name}{suffix}"
        nib.save(cls(arr, affine), str(path))
        _same(path)
    scaled = cls(rng.integers(0, 100, (3, 4, 5)).astype(np.int16), affine)
    scaled.header.set_slope_inter(0.5, -3.0)
    nib.save(scaled, str(tmp_path / f"scaled{suffix}"))
    _same(tmp_path / f"scaled{suffix}")


def test_read_nifti_multi_member_gzip_and_broken_files(tmp_path):
    arr = np.arange(60, dtype=np.float32).reshape(3, 4, 5)
    plain = tmp_path / "a.nii"
    nib.save(nib.Nifti1Image(arr, np.eye(4)), str(plain))
    data = plain.read_bytes()
    multi = tmp_path / "multi.nii.gz"  # two gzip members: valid, nibabel reads both
    multi.write_bytes(gzip.compress(data[:200]) + gzip.compress(data[200:]))
    _same(multi)
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(gzip.compress(data)[:-40])
    with pytest.raises(DatasetError, match="cannot be read as NIfTI"):
        load_nifti(broken, 3)
    with pytest.raises(DatasetError, match="file is missing"):
        load_nifti(tmp_path / "missing.nii.gz", 3)
