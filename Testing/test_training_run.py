"""Training end to end at a tiny scale: train, resume, DDP on two CPU processes, export, run in the engine."""

import hashlib
import json
import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from LiverTumorSegLib.bundle import load_bundle
from LiverTumorSegLib.cascade import run_cascade
from LiverTumorSegLib.image_io import Image, write_image
from LiverTumorSegLib.preprocess import prepare_volume, slice_stacks
from livertumorseg_training.export import ONNX_TOLERANCE, export_bundle, load_checkpoint
from livertumorseg_training.onnx_export import check_onnx_matches_torch
from livertumorseg_training.train import TrainConfig, train

from LiverTumorSegLib.errors import InputError
from test_training_data import GEOMETRY, _case, _windowed_scans


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("lits")
    for n in range(4):
        ct, labels = _case(n)
        write_image(Image(ct, GEOMETRY), root / f"volume-{n}.nii.gz")
        write_image(Image(labels, GEOMETRY), root / f"segmentation-{n}.nii.gz")
    return root


def _config(dataset, out, **overrides):
    values = dict(data=str(dataset), out=str(out), epochs=2, batch_size=4, slices_per_volume=4, tile=64, folds=1,
                  validation_cases=1, patience=5, seed=3)
    values.update(overrides)
    return TrainConfig(**values)


def test_train_resume_export_and_run_in_engine(dataset, tmp_path):
    torch.set_num_threads(1)
    result = train(_config(dataset, tmp_path / "run"), log=lambda *_: None)
    history = [json.loads(line) for line in (tmp_path / "run" / "history.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [h["epoch"] for h in history] == [1, 2]
    assert all(np.isfinite(h["train_loss"]) and np.isfinite(h["validation_loss"]) for h in history)
    assert history[1]["lr"] < 3e-4  # the decay is applied per step
    for name in ("best.pt", "last.pt", "loss_curve.png"):
        assert (tmp_path / "run" / name).stat().st_size > 0
    assert len(result.split["validation"]) == 1 and len(result.split["train"]) == 3

    resumed = train(_config(dataset, tmp_path / "run", epochs=3, resume=True), log=lambda *_: None)
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3]

    bundle = export_bundle(tmp_path / "run" / "best.pt", tmp_path / "bundle", name="tiny", version="0")
    assert load_bundle(bundle.path).manifest["training"]["split"]["train"] == result.split["train"]
    assert max(bundle.manifest["onnx_max_abs_difference"].values()) < ONNX_TOLERANCE == 1e-3

    # The engine's ONNX Runtime path gives the torch model's probabilities on the same prepared volume.
    ct, _ = _case(9)
    prepared = prepare_volume(Image(ct, GEOMETRY), bundle.contract)
    liver, tumour = run_cascade(prepared, bundle, threads=1)
    model, _ = load_checkpoint(tmp_path / "run" / "best.pt")
    with torch.no_grad():
        stacks = torch.from_numpy(slice_stacks(prepared.intensities, np.arange(prepared.intensities.shape[0])))
        torch_liver = torch.sigmoid(model.liver(stacks))[:, 0].numpy()
    # The engine's path (its own stacking, batching and sessions) against torch; float32 rounding of a
    # barely trained network reaches ~1e-4 here, a wrong stack or scale would be >= 1e-2.
    assert np.abs(torch_liver - liver).max() < 1e-3
    assert tumour.shape == liver.shape and np.isfinite(tumour).all()


def test_real_scans_join_training_and_the_holdout_is_never_read(dataset, tmp_path):
    """The held-out scan's CT is unreadable bytes: had training touched it, reading would have failed."""
    real = _windowed_scans(tmp_path / "real", names=("r0", "r1", "held"))
    (real / "held_ct.nii.gz").write_bytes(b"not a CT")
    torch.set_num_threads(1)
    logs = []
    result = train(_config(dataset, tmp_path / "run", epochs=1, real_data=str(real), real_holdout=["held"],
                           real_slices_per_volume=3), log=logs.append)
    assert result.split["real_train"] == ["r0", "r1"] and result.split["real_holdout"] == ["held"]
    assert "+2 real: r0, r1; held out: held" in logs[0]
    assert "18 training" in logs[0]  # 3 phantom cases × 4 slices + 2 real scans × 3 slices
    with pytest.raises(InputError, match="not in"):
        train(_config(dataset, tmp_path / "other", real_data=str(real), real_holdout=["nope"]), log=lambda *_: None)


def test_train_only_data_joins_training_and_keeps_the_validation_split(dataset, tmp_path):
    extra = tmp_path / "extra"
    extra.mkdir()
    for n in (0, 1):
        ct, labels = _case(n + 4)
        write_image(Image(ct, GEOMETRY), extra / f"volume-{n}.nii.gz")
        write_image(Image(labels, GEOMETRY), extra / f"segmentation-{n}.nii.gz")
    torch.set_num_threads(1)
    plain = train(_config(dataset, tmp_path / "plain", epochs=1, max_steps_per_epoch=1), log=lambda *_: None)
    logs = []
    joined = train(_config(dataset, tmp_path / "joined", epochs=1, max_steps_per_epoch=1, train_only_data=[str(extra)]),
                   log=logs.append)
    assert joined.split["validation"] == plain.split["validation"]
    assert joined.split["train"] == plain.split["train"] + ["extra/lits-0", "extra/lits-1"]
    assert "20 training" in logs[0]  # (3 phantom cases + 2 train-only cases) × 4 slices
    with pytest.raises(InputError, match="already given"):
        train(_config(dataset, tmp_path / "clash", train_only_data=[str(dataset)]), log=lambda *_: None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, dataset, out, digests):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    result = train(_config(dataset, out, epochs=1, max_steps_per_epoch=2, seed=5), log=lambda *_: None)
    digest = hashlib.sha256()
    for name, parameter in sorted(result.model.named_parameters()):
        digest.update(name.encode())
        digest.update(parameter.detach().cpu().numpy().tobytes())
    digests[rank] = digest.hexdigest()
    torch.distributed.destroy_process_group()


def test_ddp_two_processes_end_with_identical_weights(dataset, tmp_path):
    """Two gloo processes train a few steps; DDP keeps their parameters identical (BatchNorm running
    statistics are per process, as in any DDP run without SyncBatchNorm)."""
    manager = mp.Manager()
    digests = manager.dict()
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(dataset), str(tmp_path / "ddp"), digests), nprocs=2, join=True)
    assert len(digests) == 2 and digests[0] == digests[1]
    history = (tmp_path / "ddp" / "history.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(history) == 1  # only rank 0 writes the log


def test_a_coarse_liver_branch_trains_exports_and_runs_in_the_engine_as_in_torch(dataset, tmp_path):
    """--liver-scale 2: the bundle's grid multiple is 64 and ONNX Runtime (pooling and upsampling inside the
    liver graph) gives the torch branch's probabilities on the engine's prepared volume."""
    torch.set_num_threads(1)
    train(_config(dataset, tmp_path / "run", tile=32, liver_scale=2), log=lambda *_: None)
    bundle = export_bundle(tmp_path / "run" / "best.pt", tmp_path / "bundle", name="tiny", version="0")
    assert bundle.contract.spatial_multiple == 64 and bundle.manifest["model"]["liver_scale"] == 2
    ct, _ = _case(9)
    prepared = prepare_volume(Image(ct, GEOMETRY), bundle.contract)
    assert all(size % 64 == 0 for size in prepared.intensities.shape[1:])
    liver, tumour = run_cascade(prepared, bundle, threads=1)
    model, _ = load_checkpoint(tmp_path / "run" / "best.pt")
    with torch.no_grad():
        stacks = torch.from_numpy(slice_stacks(prepared.intensities, np.arange(prepared.intensities.shape[0])))
        torch_liver = torch.sigmoid(model.liver(stacks))[:, 0].numpy()
    # A network trained for two tiny epochs has near-zero BatchNorm variances that amplify float32 rounding (2e-3
    # here; ~5e-6 for trained weights); on a real CT a one-pixel shift changes trained probabilities by 0.24 and
    # corner-aligned upsampling by 0.09.
    assert np.abs(torch_liver - liver).max() < 5e-3
    assert tumour.shape == liver.shape and np.isfinite(tumour).all()


def test_fine_tuning_starts_from_a_bundle_with_the_bundle_s_function(dataset, tmp_path):
    """A bundle keeps only ONNX graphs with the BatchNorms after convolutions folded away. Read back, the cascade
    gives the bundle's probabilities in eval mode, and in training mode the rebuilt BatchNorms (batch statistics
    of the calibration batch) give the same as eval mode on that batch."""
    from livertumorseg_training.bundle_weights import initialise_from_bundle
    from livertumorseg_training.networks import build_model

    torch.set_num_threads(1)
    train(_config(dataset, tmp_path / "run", tile=32, liver_scale=2, epochs=1), log=lambda *_: None)
    bundle = export_bundle(tmp_path / "run" / "best.pt", tmp_path / "bundle", name="tiny", version="0")
    trained, _ = load_checkpoint(tmp_path / "run" / "best.pt")

    model = build_model("cascade", "lite", liver_scale=2)
    calibration = torch.rand(3, 3, 128, 128, generator=torch.Generator().manual_seed(1)) * 255
    initialise_from_bundle(model, bundle.path, calibration)
    probe = torch.rand(2, 4, 128, 192, generator=torch.Generator().manual_seed(2)) * 255
    probe[:, 3] /= 255
    # Against ONNX Runtime on the bundle's own files: float32 rounding, which the near-zero BatchNorm variances of a
    # barely trained network amplify as they do in the export itself (see above); for the shipped model, below.
    assert check_onnx_matches_torch(model.liver, bundle.path / "liver.onnx", probe[:, :3]) < ONNX_TOLERANCE
    assert check_onnx_matches_torch(model.tumor, bundle.path / "tumour.onnx", probe) < ONNX_TOLERANCE
    named = {name for name, _ in trained.named_parameters()}
    same = [name for name, p in model.named_parameters() if torch.equal(p, dict(trained.named_parameters())[name])]
    assert "liver.net.blocks.0.layers.0.conv2.weight" in same and len(same) < len(named)  # folded ones differ

    assert _folded_norms_in_training_mode_change(model, calibration, same) < ONNX_TOLERANCE

    logs = []
    train(_config(dataset, tmp_path / "tuned", tile=32, liver_scale=2, epochs=1, init_from=str(bundle.path)),
          log=logs.append)
    assert any(f"weights initialised from {bundle.path}" in line for line in logs)
    with pytest.raises(InputError, match="liver_scale 2 \\(training: 1\\)"):
        train(_config(dataset, tmp_path / "other", tile=32, epochs=1, init_from=str(bundle.path)), log=lambda *_: None)


def test_the_shipped_bundle_reads_back_into_a_cascade_that_computes_it():
    """The shipped model as the start of a fine-tuning run: torch gives ONNX Runtime's probabilities."""
    from LiverTumorSegLib.bundle import DEFAULT_BUNDLE as path
    from livertumorseg_training.bundle_weights import initialise_from_bundle
    from livertumorseg_training.networks import build_model

    torch.set_num_threads(1)
    manifest = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
    model = build_model("cascade", manifest["model"]["preset"], liver_scale=manifest["model"]["liver_scale"],
                        **manifest["model"]["flags"])
    calibration = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(1)) * 255
    initialise_from_bundle(model, path, calibration)
    probe = torch.rand(1, 4, 128, 128, generator=torch.Generator().manual_seed(2)) * 255
    probe[:, 3] /= 255
    assert check_onnx_matches_torch(model.liver, path / "liver.onnx", probe[:, :3]) < 1e-5
    assert check_onnx_matches_torch(model.tumor, path / "tumour.onnx", probe) < 1e-5
    named = {f"{name}.weight" for name in _onnx_initialiser_names(path)}
    assert _folded_norms_in_training_mode_change(model, calibration, named) < 1e-4


def _onnx_initialiser_names(bundle_path) -> set:
    import onnx

    names = set()
    for component, attribute in (("liver", "liver"), ("tumour", "tumor")):
        for tensor in onnx.load(str(bundle_path / f"{component}.onnx")).graph.initializer:
            if tensor.name.startswith("branch.") and tensor.name.endswith(".weight"):
                names.add(f"{attribute}.{tensor.name[len('branch.'):-len('.weight')]}")
    return names


def _folded_norms_in_training_mode_change(model, calibration, kept_names) -> float:
    """Largest change of the probabilities on ``calibration`` when the BatchNorms rebuilt from folded convolutions
    (those whose weight is not in ``kept_names``) normalise with batch statistics, as in training."""
    with torch.no_grad():
        reference = [torch.sigmoid(logit) for logit in model.eval()(calibration)]
        folded = [m for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)
                  and f"{n}.weight" not in kept_names]
        assert folded
        for module in folded:
            module.train()
        rebuilt = [torch.sigmoid(logit) for logit in model(calibration)]
        model.eval()
    return max(float(torch.abs(a - b).max()) for a, b in zip(reference, rebuilt))
