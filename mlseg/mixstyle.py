"""MixStyle: mix the feature statistics of the training patches inside the encoder.

Zhou et al., "Domain Generalization with MixStyle", ICLR 2021
(github.com/KaiyangZhou/mixstyle-release). With probability ``p`` per batch and per stage,
each patch's channel means and standard deviations after an early encoder stage are replaced
by a mix, ``lam * own + (1 - lam) * another patch's``, with ``lam ~ Beta(alpha, alpha)`` per
patch and the other patch a random one of the batch. Early-stage statistics carry stain,
contrast and texture rather than shape, so the network learns nuclei under styles it was not
shown. It acts in training mode only: validation, checkpoints and inference see the plain
network, and nothing is added to the weights.

The hooks go on the stages at strides 4, 8 and 16 (ResNet's ``layer1``-``layer3``), where the
paper put them in its ResNets. Encoders: those with ``layer1``-``layer3`` (ResNet, ResNeXt,
SE-ResNet, ...) and timm's (``tu-*``). Under ``train.compile`` the hooks break the graph at
each stage (they draw from numpy), which costs speed, not correctness.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import nn

STRIDES = (4, 8, 16)


class MixStyle:
    """A forward hook: the output of a stage with its per-channel statistics mixed across
    the batch. Draws from its own seeded ``rng`` so a resumed run repeats them."""

    def __init__(self, p: float, alpha: float, rng: np.random.Generator, eps: float = 1e-6):
        self.p, self.alpha, self.eps, self.rng = p, alpha, eps, rng

    def __call__(self, module: nn.Module, inputs, x: torch.Tensor) -> torch.Tensor | None:
        if not module.training or x.size(0) < 2:
            return None
        if self.rng.random() >= self.p:
            return None
        b = x.size(0)
        lam = _to(self.rng.beta(self.alpha, self.alpha, b).astype(np.float32), x.device)
        lam = lam.view(b, 1, 1, 1)
        perm = _to(self.rng.permutation(b), x.device)
        xf = x.float()
        mu = xf.mean(dim=(2, 3), keepdim=True).detach()
        sigma = (xf.var(dim=(2, 3), keepdim=True) + self.eps).sqrt().detach()
        mixed_mu = lam * mu + (1 - lam) * mu[perm]
        mixed_sigma = lam * sigma + (1 - lam) * sigma[perm]
        return ((xf - mu) / sigma * mixed_sigma + mixed_mu).to(x.dtype)


def _to(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array on ``device`` without making the host wait for the GPU's queue."""
    tensor = torch.from_numpy(array)
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def stages(encoder: nn.Module) -> list[nn.Module]:
    """The encoder's modules whose outputs have strides 4, 8 and 16; empty when the encoder
    is of a kind this module does not know."""
    if all(hasattr(encoder, f"layer{i}") for i in (1, 2, 3)):
        return [getattr(encoder, f"layer{i}") for i in (1, 2, 3)]
    net = getattr(encoder, "model", None)
    info = getattr(net, "feature_info", None)
    if info is not None:
        found = []
        for name, stride in zip(info.module_name(), info.reduction(), strict=True):
            if stride in STRIDES:
                found.append(_submodule(net, name))
        if len(found) == len(STRIDES):
            return found
    return []


def _submodule(net: nn.Module, name: str) -> nn.Module:
    try:
        return net.get_submodule(name)
    except AttributeError:  # timm's FeatureListNet flattens "stages.0" to "stages_0"
        return net.get_submodule(name.replace(".", "_"))


def attach(
    model: nn.Module, encoder_name: str, p: float, alpha: float, seed: int
) -> np.random.Generator | None:
    """Hook MixStyle onto ``model.encoder``; returns the generator of its draws (its
    ``bit_generator.state`` resumes them), or None with a warning when the encoder has no
    stages it knows (training goes on without). The hooks live on the module, not in its
    ``state_dict``."""
    found = stages(model.encoder)
    if not found:
        warnings.warn(
            f"train.mixstyle_p: MixStyle does not know the stages of encoder {encoder_name!r} "
            "(it knows ResNet-style layer1-layer3 and timm 'tu-' encoders); training without "
            "it. Set train.mixstyle_p: 0 to silence this.",
            stacklevel=2,
        )
        return None
    rng = np.random.default_rng(seed)
    hook = MixStyle(p, alpha, rng)
    for stage in found:
        stage.register_forward_hook(hook)
    return rng
