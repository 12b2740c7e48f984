"""Series selection (:mod:`apps.detect_dicom.selection`) on a study loaded by the SDK's loader: what the selector
emits holds only the series the rules keep, each once, and every other series is reported with its reason."""

from __future__ import annotations

import pytest

pytest.importorskip("monai.deploy")

from tests.apps.dicom_factory import SeriesSpec, make_affine, toy_volume, write_study  # noqa: E402

AFFINE = make_affine((0.8, 0.8, 2.0))


def _spec(num_slices: int, **options) -> SeriesSpec:
    return SeriesSpec(toy_volume((6, 5, num_slices)), AFFINE, {"modality": "CT", **options})


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """Series Instance UID by name: a good axial series, a scout (by description), one with too few slices, a
    LOCALIZER image type (the SDK's conditions) and another good one."""
    names = ["axial", "scout", "short", "localizer", "thin"]
    specs = [_spec(8, description="Axial 2mm"), _spec(8, description="Scout"), _spec(3, description="Few"),
             _spec(8, description="Plan", image_type=("ORIGINAL", "PRIMARY", "LOCALIZER")),
             _spec(6, description="Thin")]
    root = tmp_path_factory.mktemp("selection")
    uids = list(write_study(root, specs, seed="selection"))
    return root, dict(zip(names, uids, strict=True))


def _load(root):
    from monai.deploy.core import Fragment
    from monai.deploy.operators import DICOMDataLoaderOperator

    return DICOMDataLoaderOperator(Fragment()).load_data_to_studies(root)


def _select(root, rules: dict):
    """What the selector emits (``compute`` emits ``filter``'s return) and the selector."""
    from monai.deploy.core import Fragment

    from apps.detect_dicom.selection import SeriesSelector

    selector = SeriesSelector(Fragment(), rules=rules)
    return selector.filter(selector._load_rules(), _load(root), True), selector


def _emitted(selected, uids: dict[str, str]) -> list[str]:
    """The names of the series the next operator gets (it iterates ``selected_series`` of each study)."""
    name = {u: n for n, u in uids.items()}
    return sorted(name[str(s.series.SeriesInstanceUID)] for study in selected for s in study.selected_series)


def test_excluded_series_are_not_emitted_and_are_reported(study):
    from apps.detect_dicom.selection import load_rules

    root, uids = study
    selected, selector = _select(root, load_rules())
    assert _emitted(selected, uids) == ["axial", "thin"]
    assert all(s.selection_name == "CT or MR image series" for st in selected for s in st.selected_series)
    reasons = {s["series_instance_uid"]: s["reason"] for s in selector.skipped}
    assert set(reasons) == {uids["scout"], uids["short"], uids["localizer"]}
    assert "description_excludes" in reasons[uids["scout"]]
    assert "min_slices=5" in reasons[uids["short"]]
    assert "matches no selection" in reasons[uids["localizer"]]


def test_a_series_two_selections_match_is_emitted_once(study):
    root, uids = study
    rules = {"selections": [{"name": "thin CT", "conditions": {"Modality": "CT", "SeriesDescription": "Thin"}},
                            {"name": "any CT", "conditions": {"Modality": "CT"}, "min_slices": 5,
                             "description_excludes": "(?i)(scout|plan)"}]}
    selected, selector = _select(root, rules)
    assert _emitted(selected, uids) == ["axial", "thin"]
    names = {str(s.series.SeriesInstanceUID): s.selection_name for st in selected for s in st.selected_series}
    assert names[uids["thin"]] == "thin CT"
    assert {s["series_instance_uid"] for s in selector.skipped} == {uids["scout"], uids["short"], uids["localizer"]}


def test_a_series_one_selection_excludes_and_another_takes_is_selected(study):
    root, uids = study
    rules = {"selections": [{"name": "no scouts", "conditions": {"Modality": "CT"}, "min_slices": 5,
                             "description_excludes": "(?i)scout"},
                            {"name": "scouts too", "conditions": {"Modality": "CT"}, "min_slices": 5}]}
    selected, selector = _select(root, rules)
    assert _emitted(selected, uids) == ["axial", "localizer", "scout", "thin"]
    assert [s["series_instance_uid"] for s in selector.skipped] == [uids["short"], uids["short"]]  # both reasons


def test_a_study_with_nothing_selected_is_not_emitted(study):
    root, uids = study
    rules = {"selections": [{"name": "CT", "conditions": {"Modality": "CT"}, "min_slices": 100}]}
    selected, selector = _select(root, rules)
    assert selected == []
    assert len(selector.skipped) == len(uids)
    assert all("min_slices=100" in s["reason"] for s in selector.skipped)
