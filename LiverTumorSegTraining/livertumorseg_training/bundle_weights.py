"""A cascade's trainable weights read back from a model bundle's ONNX files (fine-tuning a shipped model).

A bundle keeps no torch checkpoint, only ONNX graphs exported in eval mode with constant folding: every
BatchNorm that follows a convolution is folded into that convolution (weight × γ/σ, bias β − μγ/σ), and its own
statistics are gone. The other weights keep their torch names. :func:`initialise_from_bundle` copies the named
weights, loads each folded convolution and rebuilds its BatchNorm so that

* in eval mode the network is the bundle's exactly (the folded bias goes back into the BatchNorm's shift), and
* in training mode it is nearly the bundle's from the first step: the BatchNorm's statistics and affine
  parameters are measured on a calibration batch (γ = σ, β = bias + μ with μ, σ² the batch's statistics of the
  convolution's output), so normalising by batch statistics gives back what the folded layer gave.

No library inverts ONNX constant folding into a torch module, hence this module. The ONNX graph's Conv nodes are
matched to the torch convolutions in the order a forward pass calls them (checked against every weight that kept
its name, and by shape), and the BatchNorm each was folded from is found by following the convolution's output
tensor into the next module.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from LiverTumorSegLib.bundle import MANIFEST, load_bundle
from LiverTumorSegLib.errors import InputError

from .export import BRANCHES


def is_bundle(path: str | Path) -> bool:
    """True for a model bundle folder (it holds a ``manifest.json``)."""
    return (Path(path) / MANIFEST).is_file()


def initialise_from_bundle(model: nn.Module, bundle: str | Path, calibration: torch.Tensor) -> None:
    """Loads the cascade weights of ``bundle`` into ``model`` (a ``CascadeNet`` of the same architecture).

    ``calibration``: a float (N, 3, H, W) batch of training stacks in [0, 255] on which the rebuilt BatchNorms
    measure their statistics. Raises :class:`InputError` when the bundle is not a cascade of the model's
    architecture.
    """
    import onnx
    from onnx import numpy_helper

    loaded = load_bundle(bundle)  # verified: format, engine version, file checksums
    bundle, manifest = loaded.path, loaded.manifest
    _check_architecture(model, manifest, bundle)
    folded: dict[nn.Module, torch.Tensor] = {}  # convolution → the bias folded into it
    for component, (attribute, _, _) in BRANCHES.items():
        proto = onnx.load(str(bundle / manifest["components"][component]["file"]))
        values = {tensor.name: torch.from_numpy(numpy_helper.to_array(tensor).copy()) for tensor in proto.graph.initializer}
        folded.update(_load_branch(getattr(model, attribute), proto.graph.node, values, f"{bundle.name}/{component}"))
    _rebuild_folded_norms(model, folded, calibration)


def _check_architecture(model: nn.Module, manifest: dict, bundle: Path) -> None:
    described = manifest.get("model", {})
    expected = {"name": "cascade", "preset": model.preset_name, "flags": model.flags, "liver_scale": model.liver_scale}
    found = {"name": described.get("name"), "preset": described.get("preset"), "flags": described.get("flags"),
             "liver_scale": described.get("liver_scale", 1)}
    if found != expected:
        differ = ", ".join(f"{key} {found[key]!r} (training: {expected[key]!r})" for key in expected if found[key] != expected[key])
        raise InputError(f"Bundle '{bundle}' is not a cascade of the architecture being trained: {differ}. "
                         "Train with the bundle's --preset, ablation flags and --liver-scale, or start from scratch.")


def _load_branch(branch: nn.Module, nodes, values: dict, where: str) -> dict:
    """Copies ``values`` (the ONNX initialisers) into ``branch``; returns its folded convolutions and their biases."""
    state = branch.state_dict()
    assigned: set[str] = set()
    for key in state:
        if f"branch.{key}" in values:
            _copy(state, key, values[f"branch.{key}"], where)
            assigned.add(key)
    convs = [node for node in nodes if node.op_type == "Conv"]
    order = _convolutions_in_call_order(branch)
    if len(order) != len(convs):
        raise InputError(f"{where} has {len(convs)} convolutions and the network being trained {len(order)}: the "
                         "bundle was exported from another network.")
    names = {module: name for name, module in branch.named_modules()}
    folded = {}
    for node, conv in zip(convs, order):
        path = names[conv]
        if node.input[1].startswith("branch.") and node.input[1] != f"branch.{path}.weight":
            raise InputError(f"{where}: convolution {node.name} holds {node.input[1]} where the network being "
                             f"trained runs {path}: the bundle was exported from another network.")
        _copy(state, f"{path}.weight", values[node.input[1]], where)
        assigned.add(f"{path}.weight")
        if len(node.input) > 2:
            if conv.bias is not None:
                _copy(state, f"{path}.bias", values[node.input[2]], where)
                assigned.add(f"{path}.bias")
            else:
                folded[conv] = values[node.input[2]].clone()
    for node in nodes:  # constant multipliers (the input scale) are fixed by the architecture: check them
        if node.op_type == "Mul" and node.input[1] in values and node.name.endswith("input_scale/Mul"):
            path = _module_path(node.name)
            if not torch.allclose(branch.get_submodule(path).scale.flatten(), values[node.input[1]].flatten()):
                raise InputError(f"The input scale of {where} differs from the architecture's; the bundle is not "
                                 "a cascade this trainer builds.")
    branch.load_state_dict(state)
    names = {name for name, _ in branch.named_parameters()}
    folded_norms = {n for n, module in branch.named_modules() if isinstance(module, nn.BatchNorm2d)} - \
        {key.rsplit(".", 1)[0] for key in assigned}
    missing = sorted(name for name in names - assigned if name.rsplit(".", 1)[0] not in folded_norms)
    if missing:
        raise InputError(f"{where} has no weights for {', '.join(missing[:5])}: the bundle was exported from "
                         "another network.")
    return folded


def _convolutions_in_call_order(branch: nn.Module) -> list[nn.Conv2d]:
    """The branch's convolutions in the order one forward pass calls them: the order of the traced ONNX graph's
    Conv nodes (node scope names cannot be used: a module called from a method, as the attention gates' are, is
    traced without its scope)."""
    calls: list[nn.Conv2d] = []
    hooks = [m.register_forward_pre_hook(lambda module, _: calls.append(module))
             for m in branch.modules() if isinstance(m, nn.Conv2d)]
    size = 64 * getattr(branch, "scale", 1)
    try:
        with torch.no_grad():
            branch.eval()(torch.zeros(1, branch.in_channels, size, size))
    finally:
        for hook in hooks:
            hook.remove()
    return calls


def _module_path(node_name: str) -> str:
    """The torch module path of an exported node: ``/branch/net/stem/stem.0/Conv`` → ``net.stem.0``. The scope of a
    called container's child repeats the container's name (``stem/stem.0``); children of an uncalled ModuleList
    appear only as ``blocks.0``."""
    path: list[str] = []
    for part in node_name.strip("/").split("/")[1:-1]:
        if path and part.startswith(path[-1] + "."):
            part = part[len(path[-1]) + 1:]
        path.append(part)
    return ".".join(path)


def _copy(state: dict, key: str, value: torch.Tensor, where: str) -> None:
    if tuple(state[key].shape) != tuple(value.shape):
        raise InputError(f"{where}: {key} has shape {tuple(value.shape)} in the bundle and {tuple(state[key].shape)} "
                         "in the network being trained: the bundle was exported from another network.")
    state[key].copy_(value)


def _rebuild_folded_norms(model: nn.Module, folded: dict, calibration: torch.Tensor) -> None:
    """One eval-mode pass over ``calibration``: each BatchNorm fed by a folded convolution takes the statistics of
    that convolution's output, γ = σ and β = folded bias + μ. Each is rebuilt in a pre-hook just before it runs,
    so every layer of the pass already computes the bundle's function and feeds the next the right input."""
    producers: dict[int, tuple[nn.Module, torch.Tensor]] = {}
    rebuilt: set[nn.Module] = set()
    hooks = []

    def remember(conv, _inputs, output):
        producers[id(output)] = (conv, output)

    def rebuild(norm, inputs):
        source = producers.get(id(inputs[0]))
        if source is None or source[0] not in folded or source[1] is not inputs[0]:
            return
        x = inputs[0].detach().double()
        mean, var = x.mean(dim=(0, 2, 3)), x.var(dim=(0, 2, 3), unbiased=False)
        with torch.no_grad():
            norm.running_mean.copy_(mean)
            norm.running_var.copy_(var)
            norm.weight.copy_((var + norm.eps).sqrt())
            norm.bias.copy_(folded[source[0]].double() + mean)
        rebuilt.add(norm)

    for module in model.modules():
        if isinstance(module, nn.Conv2d) and module in folded:
            hooks.append(module.register_forward_hook(remember))
        elif isinstance(module, nn.BatchNorm2d):
            hooks.append(module.register_forward_pre_hook(rebuild))
    training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(calibration.float().to(next(model.parameters()).device))
    finally:
        for hook in hooks:
            hook.remove()
        model.train(training)
    if len(rebuilt) != len(folded):
        raise InputError(f"{len(folded) - len(rebuilt)} folded convolution(s) of the bundle lead to no BatchNorm "
                         "of the network being trained: the bundle was exported from another network.")


def calibration_batch(sampler, count: int = 16) -> torch.Tensor:
    """``count`` training stacks spread evenly over ``sampler`` (a ``TileSampler``), stacked into one batch."""
    indices = np.linspace(0, len(sampler) - 1, num=min(count, len(sampler))).round().astype(int)
    return torch.stack([torch.as_tensor(sampler[int(i)][0]) for i in indices])
