"""``livertumorseg-train evaluate`` end to end: small phantom cases in LiTS layout, tiny real ONNX bundles run by
the engine, and every number of the per-case CSV checked against the metrics computed directly."""

import argparse
import json
import csv
import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from LiverTumorSegLib.bundle import load_bundle, write_bundle
from LiverTumorSegLib.errors import BundleError, InputError, OutputError
from LiverTumorSegLib.image_io import Geometry, Image, write_image
from LiverTumorSegLib.metrics import case_metrics
from LiverTumorSegLib.phantoms import generate_phantom
from LiverTumorSegLib.pipeline import segment
from LiverTumorSegLib.preprocess import InputContract
from livertumorseg_training.datasets import find_cases, load_case
from livertumorseg_training.evaluation import (
    ABLATION_ROWS, PERTURBATIONS, Run, add_evaluate_arguments, perturb, run_evaluate,
)

#: Phantoms: two with tumours, one without.
SEEDS = (0, 7, 6)


def _u8(hu: float) -> float:
    """HU → the network's 8-bit input scale (window [−100, 400])."""
    return (hu + 100.0) * 255.0 / 500.0


def _branch(path, channels: int, tumour_below_hu: float | None):
    """A tiny real ONNX branch on a 5×5-smoothed centre slice x: liver p = σ(0.25·(30 HU − |x − 100 HU|));
    tumour p = σ(0.25·(t − x)) · liver probability (hypodense voxels inside the liver)."""
    const = lambda name, value: numpy_helper.from_array(np.asarray(value, np.float32), name)
    initializers = [numpy_helper.from_array(np.array([1], np.int64), "centre"), const("gain", 0.25)]
    nodes = [helper.make_node("Gather", ["input", "centre"], ["x"], axis=1),
             helper.make_node("AveragePool", ["x"], ["xs"], kernel_shape=[5, 5], pads=[2, 2, 2, 2], count_include_pad=0)]
    if tumour_below_hu is None:
        initializers += [const("mid", _u8(100.0)), const("halfwidth", 30 * 255 / 500)]
        nodes += [helper.make_node("Sub", ["xs", "mid"], ["d"]), helper.make_node("Abs", ["d"], ["a"]),
                  helper.make_node("Sub", ["halfwidth", "a"], ["m"]), helper.make_node("Mul", ["m", "gain"], ["z"]),
                  helper.make_node("Sigmoid", ["z"], ["probability"])]
    else:
        initializers += [const("threshold", _u8(tumour_below_hu)), numpy_helper.from_array(np.array([3], np.int64), "liver")]
        nodes += [helper.make_node("Gather", ["input", "liver"], ["lp"], axis=1),
                  helper.make_node("Sub", ["threshold", "xs"], ["m"]), helper.make_node("Mul", ["m", "gain"], ["z"]),
                  helper.make_node("Sigmoid", ["z"], ["s"]), helper.make_node("Mul", ["s", "lp"], ["probability"])]
    graph = helper.make_graph(
        nodes, "branch", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", channels, "H", "W"])],
        [helper.make_tensor_value_info("probability", TensorProto.FLOAT, ["N", 1, "H", "W"])], initializers,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
    return path


def _bundle(folder, name, tumour_below_hu, flags, split=None):
    folder.mkdir()
    files = {"liver.onnx": _branch(folder / "l.onnx", 3, None), "tumour.onnx": _branch(folder / "t.onnx", 4, tumour_below_hu)}
    manifest = {"name": name, "version": "1.0", "input": InputContract().to_dict(),
                "model": {"name": "cascade", "preset": "lite", "flags": flags},
                "components": {"liver": {"file": "liver.onnx"}, "tumour": {"file": "tumour.onnx"}},
                "training": {"split": split or {}}}
    return write_bundle(folder / "bundle", manifest, files).path


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluation")
    data = root / "data"
    data.mkdir()
    for number, seed in enumerate(SEEDS):
        phantom = generate_phantom(seed, size="small")
        # Keep the engine's work small: crop around the liver and call the pixels 1 mm (the processing
        # grid), so that the engine does not upsample the phantom's 2.4–3.6 mm pixels.
        zs, ys, xs = np.nonzero(phantom.label)
        box = (slice(max(zs.min() - 2, 0), zs.max() + 3), slice(max(ys.min() - 6, 0), ys.max() + 7),
               slice(max(xs.min() - 6, 0), xs.max() + 7))
        geometry = Geometry((1.0, 1.0, phantom.image.geometry.spacing[2]), phantom.image.geometry.origin,
                            phantom.image.geometry.direction)
        image = Image(np.ascontiguousarray(phantom.image.array[box]), geometry)
        write_image(image, data / f"volume-{number}.nii.gz")
        write_image(image.with_array(np.ascontiguousarray(phantom.label[box])), data / f"segmentation-{number}.nii.gz")
    all_on = {"dense_skips": True, "subpixel": True, "attention": True}
    full = _bundle(root / "full", "tiny-full", 75.0, all_on, split={"test": ["lits-0", "lits-1", "lits-2"], "train": ["lits-9"]})
    other = _bundle(root / "other", "tiny-other", 55.0, all_on)
    baseline = _bundle(root / "baseline", "tiny-baseline", 65.0, {"dense_skips": False, "subpixel": False, "attention": False})
    return {"root": root, "data": data, "full": full, "other": other, "baseline": baseline}


def _parse(argv):
    parser = argparse.ArgumentParser(prog="livertumorseg-train evaluate")
    add_evaluate_arguments(parser).set_defaults(run=run_evaluate)
    return parser.parse_args([str(a) for a in argv])


def _read_csv(path):
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def evaluated(workspace):
    w = workspace
    out = w["root"] / "results"
    md = w["root"] / "docs" / "RESULTS.md"
    args = _parse(["--bundle", f"proposed={w['full']}", "--bundle", f"weaker={w['other']}",
                   "--bundle", f"hdenseunet={w['root'] / 'nowhere'}", "--data", w["data"], "--split", "test",
                   "--ablation-baseline", w["baseline"], "--ablation-dense", w["root"] / "not-trained-yet",
                   "--out", out, "--results-md", md, "--workers", "1", "--no-progress"])
    assert args.run(args) == 0
    return out, md


def test_results_markdown_has_every_table(evaluated, workspace):
    out, md = evaluated
    text = (out / "RESULTS.md").read_text(encoding="utf-8")
    for heading in ("## Bundles", "## Method comparison (Table 4)", "## Ablation (Table 5)", "(Table 6)",
                    "## Robustness (§4.8)", "## Examples", "## Definitions"):
        assert heading in text
    assert "livertumorseg-train evaluate --bundle proposed=" in text and "--split test" in text
    assert "`lits-0`, `lits-1`, `lits-2`" in text and "tiny-full 1.0" in text and "tiny-baseline 1.0" in text
    assert "the 'test' split recorded in the bundle tiny-full 1.0" in text
    # Missing bundles and stages are said, never filled in.
    assert "| `hdenseunet` | not trained |" in text
    ablation = text.split("## Ablation (Table 5)")[1].split("##")[0]
    rows = [line for line in ablation.splitlines() if line.startswith("| ") and "Configuration" not in line]
    assert [row.split(" | ")[0][2:] for row in rows] == [row for row, _, _ in ABLATION_ROWS]
    assert "not trained" in rows[1] and "not available: the bundle has no lesion_classifier" in rows[4]
    assert "not available: the bundle has no lesion_classifier, boundary_cnn" in rows[5]
    assert all(label in text for _, _, label in PERTURBATIONS)
    for name in ("dice_boxplot", "size_stratified", "robustness", "overlay_best", "overlay_median", "overlay_worst"):
        assert (out / "figures" / f"{name}.png").stat().st_size > 1000
        assert f"(figures/{name}.png)" in text
    copy = md.read_text(encoding="utf-8")
    assert "(../results/figures/dice_boxplot.png)" in copy
    assert copy.replace("../results/figures/", "figures/") == text


def test_per_case_csv_equals_metrics_computed_directly(evaluated, workspace):
    out, _ = evaluated
    rows = _read_csv(out / "per_case.csv")
    cases = {case.case_id: case for case in find_cases(workspace["data"])}
    full = load_bundle(workspace["full"])
    assert {r["case"] for r in rows} == set(cases)
    checks = [("proposed", Run("proposed", "proposed")),
              ("robustness-noise-10", Run("x", "proposed", perturbation=("noise", 10.0))),
              ("ablation-3", Run("x", "proposed", slice_consistency=False, radiomics=False, refine=False))]
    for run_key, run in checks:
        for case_id in ("lits-0", "lits-2"):
            (row,) = [r for r in rows if r["case"] == case_id and r["run"] == run_key]
            image, reference = load_case(cases[case_id])
            labels = segment(perturb(image, run.perturbation, seed=0, case_id=case_id), full, run.options("cpu")).labels
            expected = case_metrics(labels.array, reference, image.geometry.spacing)
            for key, value in expected.items():
                got = float(row[key])
                assert (math.isnan(got) and math.isnan(value)) or got == value, (run_key, case_id, key, got, value)
    assert any(float(r["tumour_reference_voxels"]) > 0 and 0 < float(r["tumour_dice"]) < 1 for r in rows)


def test_table_csvs_agree_with_per_case_rows(evaluated):
    out, _ = evaluated
    rows = [r for r in _read_csv(out / "per_case.csv") if r["run"] == "proposed"]
    table4 = {(r["method"], r["metric"]): r for r in _read_csv(out / "table4_methods.csv")}
    dice = [float(r["tumour_dice"]) for r in rows]
    assert float(table4[("proposed", "tumour_dice")]["value"]) == pytest.approx(np.mean(dice))
    assert float(table4[("proposed", "tumour_dice")]["std"]) == pytest.approx(np.std(dice, ddof=1))
    pooled = 2 * sum(float(r["tumour_intersection_voxels"]) for r in rows) / sum(
        float(r["tumour_predicted_voxels"]) + float(r["tumour_reference_voxels"]) for r in rows)
    assert float(table4[("proposed", "tumour")]["value"]) == pytest.approx(pooled)
    burden = np.sqrt(np.mean([float(r["tumour_burden_error"]) ** 2 for r in rows]))
    assert float(table4[("proposed", "burden_rmse")]["value"]) == pytest.approx(burden)
    assert table4[("hdenseunet", "tumour_dice")]["status"] == "not trained"
    wilcoxon = _read_csv(out / "table4_wilcoxon.csv")
    assert {(w["other"], w["metric"]) for w in wilcoxon} == {
        (o, m) for o in ("weaker", "hdenseunet") for m in ("tumour_dice", "tumour_sensitivity")}
    ablation = _read_csv(out / "table5_ablation.csv")
    assert [a["status"] for a in ablation][:4] == ["run", "not trained", "run", "run"]
    three_slice = [float(r["tumour_dice"]) for r in _read_csv(out / "per_case.csv") if r["run"] == "proposed"]
    assert float(ablation[3]["mean"]) == pytest.approx(np.mean(three_slice))  # same run as the full bundle's
    assert float(ablation[3]["change"]) == pytest.approx(float(ablation[3]["mean"]) - float(ablation[2]["mean"]))
    lesions = [l for l in _read_csv(out / "per_lesion.csv") if l["bundle"] == "proposed"]
    size = {(r["method"], r["stratum"]): r for r in _read_csv(out / "table6_size.csv")}
    for stratum in ("small", "medium", "large"):
        chosen = [float(l["dice"]) for l in lesions if l["stratum"] == stratum]
        assert int(size[("proposed", stratum)]["lesions"]) == len(chosen)
        if chosen:
            assert float(size[("proposed", stratum)]["dice_mean"]) == pytest.approx(np.mean(chosen))
    robustness = _read_csv(out / "robustness.csv")
    assert robustness[0]["perturbation"].startswith("None") and float(robustness[0]["tumour_dice_change"]) == 0.0


def test_parallel_workers_give_identical_numbers(evaluated, workspace):
    out, _ = evaluated
    w = workspace
    args = _parse(["--bundle", f"proposed={w['full']}", "--data", w["data"], "--cases", "0", "lits-2",
                   "--out", w["root"] / "parallel", "--workers", "2", "--no-ablation", "--no-robustness", "--no-progress"])
    assert run_evaluate(args) == 0
    parallel = _read_csv(w["root"] / "parallel" / "per_case.csv")
    serial = {(r["case"], r["run"]): r for r in _read_csv(out / "per_case.csv")}
    assert [r["case"] for r in parallel] == ["lits-0", "lits-2"]
    for row in parallel:
        assert row == serial[(row["case"], row["run"])]
    assert "Ablation" not in (w["root"] / "parallel" / "RESULTS.md").read_text(encoding="utf-8")


def test_perturbations_are_defined_and_seeded():
    image = Image(np.full((3, 8, 8), 100, np.int16), None)
    scaled = perturb(image, ("scale", 1.1), seed=0, case_id="a").array
    assert scaled.dtype == np.float32 and np.allclose(scaled, 110.0)
    noisy = perturb(image, ("noise", 10.0), seed=0, case_id="a").array
    assert np.array_equal(noisy, perturb(image, ("noise", 10.0), seed=0, case_id="a").array)
    assert not np.array_equal(noisy, perturb(image, ("noise", 10.0), seed=0, case_id="b").array)
    assert 5 < (noisy - 100).std() < 15
    assert perturb(image, None, seed=0, case_id="a") is image


def test_bad_inputs_are_refused_before_any_work(evaluated, workspace):
    out, _ = evaluated
    w = workspace
    base = ["--bundle", f"proposed={w['full']}", "--data", w["data"], "--no-progress"]
    with pytest.raises(OutputError, match="already exists"):
        run_evaluate(_parse([*base, "--out", out]))
    with pytest.raises(InputError, match="not found"):
        run_evaluate(_parse([*base, "--cases", "lits-77", "--out", w["root"] / "x"]))
    with pytest.raises(InputError, match="no 'validation' cases"):
        run_evaluate(_parse([*base, "--split", "validation", "--out", w["root"] / "x"]))
    with pytest.raises(BundleError, match="No model bundle"):
        run_evaluate(_parse(["--bundle", f"proposed={w['root'] / 'missing'}", "--data", w["data"], "--out", w["root"] / "x"]))
    with pytest.raises(InputError, match="NAME=PATH"):
        run_evaluate(_parse(["--bundle", str(w["full"]), "--data", w["data"], "--out", w["root"] / "x"]))
    with pytest.raises(InputError, match="not starting with"):
        run_evaluate(_parse(["--bundle", f"robustness-x={w['full']}", "--data", w["data"], "--out", w["root"] / "x"]))
    with pytest.raises(InputError, match="unique"):
        run_evaluate(_parse([*base, "--bundle", f"proposed={w['other']}", "--out", w["root"] / "x"]))
    assert not (w["root"] / "x").exists()


def test_a_split_recorded_with_folder_prefixes_selects_the_cases_of_the_given_folder(workspace):
    """A model trained on several folders records FOLDER/ID; --split takes the ids of the --data folder given."""
    from livertumorseg_training.evaluation.plan import EvaluationConfig, select_cases

    w = workspace
    split = {"validation": ["data/lits-1", "elsewhere/lits-0", "data/lits-2"], "train": ["elsewhere/lits-3"],
             "real_holdout": ["lits-0"]}
    bundle = load_bundle(_bundle(w["root"] / "prefixed", "tiny-prefixed", 75.0,
                                 {"dense_skips": True, "subpixel": True, "attention": True}, split=split))
    chosen, selection = select_cases(EvaluationConfig([], w["data"], w["root"] / "x", split="validation"), bundle)
    assert [case.case_id for case in chosen] == ["lits-1", "lits-2"]
    assert selection == "the 'validation' split recorded in the bundle tiny-prefixed 1.0"
    chosen, _ = select_cases(EvaluationConfig([], w["data"], w["root"] / "x", split="real_holdout"), bundle)
    assert [case.case_id for case in chosen] == ["lits-0"]
    with pytest.raises(InputError, match="belongs to the --data folder"):
        select_cases(EvaluationConfig([], w["data"], w["root"] / "x", split="train"), bundle)
    # A one-folder model records bare ids; the manifest names its folder, so another folder's cases do not match.
    manifest = dict(bundle.manifest, training={"data": "elsewhere", "split": {"test": ["lits-0"]}})
    (bundle.path / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    with pytest.raises(InputError, match="belongs to the --data folder"):
        select_cases(EvaluationConfig([], w["data"], w["root"] / "x", split="test"), load_bundle(bundle.path))
