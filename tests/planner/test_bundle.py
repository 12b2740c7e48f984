"""Bundle generation from the template: placeholders, metadata (offline schema), ConfigParser, safety."""

from __future__ import annotations

import json

import jsonschema
import numpy as np
import pytest
from monai.bundle import ConfigParser
from monai.transforms import Compose, Transposed

from planner.bundle import (
    SCHEMA_DIR,
    TEMPLATE_DIR,
    BundleError,
    fill_json,
    find_placeholders,
    generate_bundle,
    verify_bundle,
)
from planner.dataset import DatasetInfo
from planner.plan.plan import AnchorPlan, ArchitecturePlan, Plan
from planner.preprocess.run import load_preprocessing
from planner.preprocess.transforms import (
    CropForegroundNonzerod,
    NormalizePerModalityd,
    ResampleToSpacingd,
)


def make_plan(
    dim: int = 3,
    target_spacing: list[float] | None = None,
    transpose_forward: list[int] | None = None,
    schemes: list[str] | None = None,
    use_mask: list[bool] | None = None,
    intensity: list[dict[str, float]] | None = None,
    modalities: dict[str, str] | None = None,
    labels: dict[str, str] | None = None,
    task: str = "Task100D3_Test",
) -> Plan:
    """A small but complete plan built from the dataclasses (no planner run)."""
    modalities = modalities or {"0": "MRI"}
    labels = labels or {"0": "A", "1": "B"}
    n = len(modalities)
    target_spacing = target_spacing or [1.0] * dim
    transpose_forward = transpose_forward or list(range(dim))
    transpose_backward = [int(i) for i in np.argsort(transpose_forward)]
    arch = ArchitecturePlan(
        arch_name="RetinaUNetV001", dim=dim, in_channels=n, num_classes=len(labels),
        conv_kernels=[[3] * dim] * 3, strides=[[1] * dim, [2] * dim, [2] * dim], decoder_levels=[1, 2],
    )
    anchors = AnchorPlan(
        base_sizes=[[4.0, 8.0, 16.0]] * dim, sizes=[[[4.0, 8.0, 16.0]] * dim] * 2, mean_best_iou=0.7,
        num_anchors_per_location=3**dim,
    )
    return Plan(
        planner_id=f"D{dim}V001", mode=f"{dim}d", task=task, dim=dim, modalities=modalities, labels=labels,
        target_spacing=target_spacing, transpose_forward=transpose_forward, transpose_backward=transpose_backward,
        normalization_schemes=schemes or ["nonCT"] * n, use_mask_for_norm=use_mask or [False] * n,
        intensity_properties=intensity
        or [{"mean": 0.5, "std": 0.25, "percentile_00_5": 0.0, "percentile_99_5": 1.2}] * n,
        patch_size=[16] * dim, batch_size=4, median_shape_transposed=[20.0] * dim, do_dummy_2D_data_aug=False,
        trigger_lr=False, architecture=arch, anchors=anchors, memory_estimate_bytes=10, memory_budget_bytes=20,
    )


def make_dataset(plan: Plan) -> DatasetInfo:
    return DatasetInfo(task=plan.task, dim=plan.dim, labels=dict(plan.labels), modalities=dict(plan.modalities))


@pytest.fixture()
def plan() -> Plan:
    return make_plan(
        target_spacing=[1.0, 1.5, 2.0], transpose_forward=[2, 0, 1], schemes=["CT", "nonCT"], use_mask=[False, True],
        modalities={"0": "CT", "1": "T2"},
        intensity=[{"mean": 40.0, "std": 30.0, "percentile_00_5": -100.0, "percentile_99_5": 200.0},
                   {"mean": 0.0, "std": 1.0, "percentile_00_5": 0.0, "percentile_99_5": 1.0}],
    )


@pytest.fixture()
def bundle(tmp_path, plan):
    return generate_bundle(plan, make_dataset(plan), tmp_path / "models" / plan.task / plan.model_name)


def test_generated_bundle_has_no_placeholder_and_holds_the_plan(bundle, plan):
    assert find_placeholders(bundle) == []
    for f in bundle.rglob("*"):
        if f.is_file() and f.suffix in (".json", ".md", ".conf"):
            assert "@@" not in f.read_text(), f
    assert Plan.from_json(bundle / "configs" / "plan.json") == plan
    assert (bundle / "docs" / "README.md").is_file() and (bundle / "configs" / "logging.conf").is_file()
    # the template does have placeholders: the test above is not vacuous
    assert find_placeholders(TEMPLATE_DIR)
    # the bundle's scripts are copied (without caches), the schema is not
    assert (bundle / "scripts" / "__init__.py").is_file()
    assert not list(bundle.rglob("__pycache__")) and not (bundle / "schema").exists()


def test_metadata_is_valid_against_the_local_monai_schema(bundle, plan):
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    schema = json.loads((SCHEMA_DIR / "meta_schema_20240725.json").read_text())
    jsonschema.validate(meta, schema)  # independent of MONAI's wrapper used by verify_bundle
    assert meta["schema"].endswith("/meta_schema_20240725.json")
    fmt = meta["network_data_format"]
    assert fmt["inputs"]["image"]["num_channels"] == 2
    assert fmt["inputs"]["image"]["channel_def"] == {"0": "CT", "1": "T2"}
    assert fmt["inputs"]["image"]["spatial_shape"] == plan.patch_size
    assert set(fmt["outputs"]) == {"boxes", "scores", "labels"}
    assert fmt["outputs"]["boxes"]["num_channels"] == 6
    assert fmt["outputs"]["labels"]["channel_def"] == {"0": "A", "1": "B"}
    import monai
    import torch

    assert meta["monai_version"] == monai.__version__
    assert torch.__version__.startswith(meta["pytorch_version"])


def test_broken_metadata_is_rejected(bundle):
    meta_file = bundle / "configs" / "metadata.json"
    meta = json.loads(meta_file.read_text())
    del meta["authors"]
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="metadata.json"):
        verify_bundle(bundle)


def test_all_configs_parse_with_monai_config_parser(bundle):
    files = sorted((bundle / "configs").glob("*.json"))
    assert {f.name for f in files} >= {"metadata.json", "preprocessing.json", "plan.json"}
    for f in files:
        parser = ConfigParser()
        # an overlay (multi_gpu_train.json) is read as monai.bundle run reads it: after train.json
        parser.read_config([str(f.parent / "train.json"), str(f)] if f.name.startswith("multi_gpu_") else str(f))
        parser.parse()
    verify_bundle(bundle)
    # a later config may reference ids of another config and the metadata (as `monai.bundle run` layers them)
    extra = {"pre": "@preprocessing", "channels": "@_meta_#network_data_format#inputs#image#num_channels"}
    (bundle / "configs" / "inference.json").write_text(json.dumps(extra))
    verify_bundle(bundle)
    (bundle / "configs" / "inference.json").write_text(json.dumps({"net": "@no_such_component"}))
    with pytest.raises(BundleError, match="inference.json"):
        verify_bundle(bundle)


def test_multi_gpu_overlay_is_checked_on_top_of_train_json(bundle):
    overlay = bundle / "configs" / "multi_gpu_train.json"
    cfg = json.loads(overlay.read_text())
    assert cfg["train#trainer#network"] == "@ddp_network"
    verify_bundle(bundle)
    # an overlay id reaching into train.json must point at something that resolves there
    overlay.write_text(json.dumps({**cfg, "train#trainer#network": "@ddp_netwrk"}))
    with pytest.raises(BundleError, match="multi_gpu_train.json.*train#trainer#network"):
        verify_bundle(bundle)
    overlay.write_text(json.dumps(cfg))


def test_preprocessing_config_instantiates_the_transform_chain(bundle, plan):
    chain = load_preprocessing(bundle)
    assert isinstance(chain, Compose)
    kinds = [type(t) for t in chain.transforms]
    assert kinds == [CropForegroundNonzerod, Transposed, ResampleToSpacingd, NormalizePerModalityd]
    resample, norm = chain.transforms[2], chain.transforms[3]
    assert resample.target_spacing == plan.target_spacing_transposed
    assert resample.transpose_forward == plan.transpose_forward
    assert norm.schemes == plan.normalization_schemes and norm.use_mask == plan.use_mask_for_norm
    assert norm.props == plan.intensity_properties

    rng = np.random.default_rng(0)
    image = np.zeros((2, 12, 10, 8), np.float32)
    image[:, 2:10, 1:9, 1:7] = rng.normal(50, 20, (2, 8, 8, 6))
    out = chain({"image": image, "spacing": [1.0, 1.0, 1.0]})
    # transposed [2, 0, 1] and resampled: round(shape_t * 1 / target_t)
    shape_t = [6, 8, 8]
    expect = [round(s / t) for s, t in zip(shape_t, plan.target_spacing_transposed, strict=True)]
    assert list(out["image"].shape) == [2, *expect]
    assert out["image"].dtype == np.float32


def test_refuses_to_overwrite_and_overwrite_keeps_training_outputs(bundle, plan):
    with pytest.raises(FileExistsError, match="overwrite"):
        generate_bundle(plan, make_dataset(plan), bundle)
    (bundle / "fold0").mkdir()
    (bundle / "fold0" / "model.pt").write_bytes(b"weights")
    (bundle / "configs" / "preprocessing.json").write_text("{}")
    generate_bundle(plan, make_dataset(plan), bundle, overwrite=True)
    assert (bundle / "fold0" / "model.pt").read_bytes() == b"weights"
    assert "preprocessing" in json.loads((bundle / "configs" / "preprocessing.json").read_text())
    assert not [p for p in bundle.parent.iterdir() if p.name.startswith(".")], "temp folders left behind"


def test_unknown_placeholder_fails_and_leaves_nothing(tmp_path, plan):
    template = tmp_path / "template"
    (template / "configs").mkdir(parents=True)
    for name in ("metadata.json", "preprocessing.json"):
        (template / "configs" / name).write_text((TEMPLATE_DIR / "configs" / name).read_text())
    (template / "configs" / "extra.json").write_text(json.dumps({"x": "@@plan.no_such_key@@"}))
    out = tmp_path / "out" / "bundle"
    with pytest.raises(BundleError, match="no_such_key"):
        generate_bundle(plan, make_dataset(plan), out, template_dir=template)
    assert not out.exists()
    assert list((tmp_path / "out").iterdir()) == []


def test_verify_finds_a_left_placeholder_and_bad_reference(bundle):
    pre = bundle / "configs" / "preprocessing.json"
    cfg = json.loads(pre.read_text())
    cfg["plan_id"] = "@@plan.plan_id@@"
    pre.write_text(json.dumps(cfg))
    with pytest.raises(BundleError, match="placeholder"):
        verify_bundle(bundle)
    cfg["plan_id"] = "D3V001_3d"
    cfg["preprocessing"]["transforms"][0]["keys"] = "@no_such_id"
    pre.write_text(json.dumps(cfg))
    with pytest.raises(BundleError, match="ConfigParser"):
        verify_bundle(bundle)


def test_fill_json_replaces_whole_strings_by_values_and_inline_by_text():
    ctx = {"plan": {"a": [1, 2], "b": {"c": True}, "name": "D3"}}
    got = fill_json({"x": "@@plan.a@@", "y": ["@@plan.b.c@@", "n=@@plan.a.1@@ @@plan.name@@"], "z": 3}, ctx)
    assert got == {"x": [1, 2], "y": [True, "n=2 D3"], "z": 3}
    got["x"].append(3)
    assert ctx["plan"]["a"] == [1, 2]  # values are copied, not shared


def test_2d_plan_bundle(tmp_path):
    plan = make_plan(dim=2, target_spacing=[0.5, 0.7], task="Task101D2_Test")
    out = generate_bundle(plan, make_dataset(plan), tmp_path / plan.model_name)
    meta = json.loads((out / "configs" / "metadata.json").read_text())
    assert meta["network_data_format"]["outputs"]["boxes"]["num_channels"] == 4
    chain = load_preprocessing(out)
    res = chain({"image": np.ones((1, 10, 14), np.float32), "spacing": [1.0, 1.0]})
    assert res["image"].shape == (1, 20, 20)


def test_train_config_lists_nndetection_schedule_and_augmentation(bundle, plan, monkeypatch):
    import sys

    monkeypatch.syspath_prepend(str(bundle))  # as `monai.bundle run` does: the bundle's scripts/ package
    for name in [n for n in sys.modules if n == "scripts" or n.startswith("scripts.")]:
        monkeypatch.delitem(sys.modules, name)
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "train.json"))
    parser["bundle_root"] = str(bundle)
    # nnDetection's training defaults, readable (and overridable) as config ids
    assert [parser[k] for k in ("epochs", "swa_epochs", "iterations", "warmup", "lr", "weight_decay")] == [
        50, 10, 2500, 4000, 0.01, 3e-05]
    assert parser["batch_size"] == plan.batch_size and parser["patch_size"] == plan.patch_size
    aug = parser.get_parsed_content("train#augmentation")
    assert (aug.p_rotation, aug.rotation_deg, aug.p_scale, aug.scale_range) == (0.2, 30.0, 0.2, (0.7, 1.4))
    assert (aug.p_noise, aug.p_blur, aug.p_brightness, aug.p_contrast, aug.p_gamma_inverted, aug.p_gamma) == (
        0.1, 0.2, 0.15, 0.15, 0.1, 0.3)
    assert aug.dim == plan.dim
