"""Model bundles: writing, verification, refusal of damaged or unknown bundles, real ONNX Runtime sessions."""

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from LiverTumorSegLib.bundle import DEFAULT_BUNDLE, MANIFEST, load_bundle, write_bundle
from LiverTumorSegLib.errors import BundleError, DeviceError
from LiverTumorSegLib.preprocess import InputContract


def _mean_sigmoid_onnx(path, channels: int):
    """A tiny real ONNX model with the branch contract: (N, C, H, W) → sigmoid(mean over C), (N, 1, H, W)."""
    node_mean = helper.make_node("ReduceMean", ["input"], ["mean"], keepdims=1, axes=[1])
    node_sig = helper.make_node("Sigmoid", ["mean"], ["probability"])
    graph = helper.make_graph(
        [node_mean, node_sig], "branch",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", channels, "H", "W"])],
        [helper.make_tensor_value_info("probability", TensorProto.FLOAT, ["N", 1, "H", "W"])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
    return path


@pytest.fixture
def bundle_dir(tmp_path):
    files = {"liver.onnx": _mean_sigmoid_onnx(tmp_path / "l.onnx", 3), "tumour.onnx": _mean_sigmoid_onnx(tmp_path / "t.onnx", 4)}
    manifest = {
        "name": "test", "version": "1",
        "input": InputContract().to_dict(),
        "components": {"liver": {"file": "liver.onnx"}, "tumour": {"file": "tumour.onnx"}},
    }
    write_bundle(tmp_path / "bundle", manifest, files)
    return tmp_path / "bundle"


def test_written_bundle_loads_and_runs(bundle_dir):
    bundle = load_bundle(bundle_dir)
    assert bundle.contract == InputContract()
    assert set(bundle.manifest["files"]) == {"liver.onnx", "tumour.onnx"}
    session = bundle.session("liver", threads=1)
    x = np.zeros((2, 3, 32, 64), np.float32)
    out = session.run(None, {"input": x})[0]
    assert out.shape == (2, 1, 32, 64) and np.allclose(out, 0.5)
    assert bundle.has("tumour") and not bundle.has("boundary_cnn")
    with pytest.raises(BundleError, match="no 'boundary_cnn' component"):
        bundle.file("boundary_cnn")


def test_sessions_use_the_engine_options(bundle_dir):
    """Threads as asked, one inter-op thread, all graph optimisations, idle threads sleep instead of spinning."""
    import onnxruntime

    options = load_bundle(bundle_dir).session("liver", threads=2).get_session_options()
    assert options.intra_op_num_threads == 2 and options.inter_op_num_threads == 1
    assert options.graph_optimization_level == onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_tampered_file_is_refused(bundle_dir):
    path = bundle_dir / "liver.onnx"
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(BundleError, match="checksum of 'liver.onnx' does not match"):
        load_bundle(bundle_dir)


def test_missing_file_is_refused(bundle_dir):
    (bundle_dir / "tumour.onnx").unlink()
    with pytest.raises(BundleError, match="'tumour.onnx' is missing"):
        load_bundle(bundle_dir)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda m: m.update(format_version=99), "format version 99"),
        (lambda m: m.update(format="something-else"), "not a LiverTumorSeg model bundle"),
        (lambda m: m["files"].update({"weights.pkl": {"sha256": "0"}}), "not an allowed file"),
        (lambda m: m["components"].update(extra={"file": "extra.onnx"}), "not listed with a checksum"),
        (lambda m: m.pop("input"), "input contract"),
        (lambda m: m["input"].update(hu_window=[100, 100]), "hu_window must be"),
        (lambda m: m["input"].update(in_plane_spacing_mm=0), "in_plane_spacing_mm must be positive"),
        (lambda m: m.update(components=[{"file": "liver.onnx"}]), "'components' in manifest.json must map"),
        (lambda m: m.update(files=None), "'files' in manifest.json must map"),
        (lambda m: m.update(inference={"liver_scales": [1.0, 2.0]}), r"liver_scales .* between 0.8 and 1.25"),
        (lambda m: m.update(inference={"liver_scales": []}), "inference.liver_scales in manifest.json is invalid"),
        (lambda m: m.update(inference={"liver_scales": 1.0}), "inference.liver_scales in manifest.json is invalid"),
        (lambda m: m.update(inference=[1.0]), "inference.liver_scales in manifest.json is invalid"),
    ],
    ids=["version", "format", "pickle", "unlisted", "no-input", "zero-width-window", "zero-spacing",
         "components-list", "files-null", "scale-out-of-range", "no-scales", "scale-not-a-list", "inference-list"],
)
def test_bad_manifests_are_refused(bundle_dir, change, message):
    manifest = json.loads((bundle_dir / MANIFEST).read_text(encoding="utf-8"))
    change(manifest)
    (bundle_dir / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=message):
        load_bundle(bundle_dir)


def test_manifest_that_is_a_list_is_refused(bundle_dir):
    (bundle_dir / MANIFEST).write_text("[1, 2]")
    with pytest.raises(BundleError, match="holds a JSON list, not an object"):
        load_bundle(bundle_dir)


def test_corrupt_onnx_with_a_matching_checksum_is_refused_by_onnx_runtime(tmp_path):
    """The checksum proves the file is what was exported, not that it is a model: the session says so."""
    (tmp_path / "broken.onnx").write_bytes(b"\x08\x07 not a protobuf model")
    manifest = {"input": InputContract().to_dict(), "components": {"liver": {"file": "broken.onnx"}}}
    bundle = write_bundle(tmp_path / "bundle", manifest, {"broken.onnx": tmp_path / "broken.onnx"})
    with pytest.raises(BundleError, match="ONNX Runtime cannot load 'broken.onnx'"):
        bundle.session("liver")


def test_not_json_and_not_a_bundle(tmp_path, bundle_dir):
    with pytest.raises(BundleError, match="missing manifest.json"):
        load_bundle(tmp_path / "nothing")
    (bundle_dir / MANIFEST).write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle(bundle_dir)


def test_pickle_files_cannot_enter_a_bundle(tmp_path):
    (tmp_path / "model.pkl").write_bytes(b"x")
    with pytest.raises(BundleError, match="only ONNX and JSON"):
        write_bundle(tmp_path / "b", {"input": InputContract().to_dict(), "components": {}}, {"model.pkl": tmp_path / "model.pkl"})
    assert not (tmp_path / "b").exists()


def test_cuda_request_without_cuda_is_explained(bundle_dir):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    with pytest.raises(DeviceError, match="no CUDA support") as raised:
        load_bundle(bundle_dir).session("liver", device="cuda")
    assert raised.value.exit_code == 5


def test_the_bundled_demo_model_verifies():
    bundle = load_bundle(DEFAULT_BUNDLE)
    assert bundle.has("liver") and bundle.has("tumour")
    assert sum(f.stat().st_size for f in DEFAULT_BUNDLE.iterdir()) < 30 * 2**20
    assert bundle.manifest["training"]["split"]["train"], "provenance lists the training cases"
