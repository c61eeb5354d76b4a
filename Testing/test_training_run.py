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
