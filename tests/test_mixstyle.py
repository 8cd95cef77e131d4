"""MixStyle: feature statistics mixed across the batch in training only, on the right stages,
never saved into the weights, resumed with the run."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from mlseg.config import TrainConfig, load_config
from mlseg.mixstyle import MixStyle, attach, stages
from mlseg.model import build_model


def _styled_batch() -> torch.Tensor:
    """Two patches with the same content and very different per-channel statistics."""
    content = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    return torch.cat([content * 0.5 + 1.0, content * 3.0 - 2.0])


def test_mixstyle_moves_statistics_between_patches_and_keeps_content() -> None:
    stage = nn.Identity()
    stage.register_forward_hook(MixStyle(p=1.0, alpha=0.1, rng=np.random.default_rng(1)))
    x = _styled_batch()
    mixed = [stage(x) for _ in range(20)]
    means = torch.stack([m.mean(dim=(2, 3)) for m in mixed])  # (draws, 2 patches, 4 channels)
    # every mixed mean lies between the two patches' own means, and some move far from home
    low, high = x.mean(dim=(2, 3)).min(0).values, x.mean(dim=(2, 3)).max(0).values
    assert bool(((means >= low - 1e-4) & (means <= high + 1e-4)).all())
    assert float((means[:, 0] - x[0].mean(dim=(1, 2))).abs().max()) > 1.0
    # the content (the normalised features) is untouched
    for m in mixed:
        a = (m[0] - m[0].mean()).flatten()
        b = (x[0] - x[0].mean()).flatten()
        assert float(torch.nn.functional.cosine_similarity(a, b, dim=0)) > 0.99


def test_mixstyle_is_off_in_eval_mode_and_at_p_zero() -> None:
    x = _styled_batch()
    stage = nn.Identity()
    stage.register_forward_hook(MixStyle(p=1.0, alpha=0.1, rng=np.random.default_rng(0)))
    stage.eval()
    assert torch.equal(stage(x), x)
    never = nn.Identity()
    never.register_forward_hook(MixStyle(p=0.0, alpha=0.1, rng=np.random.default_rng(0)))
    assert torch.equal(never(x), x)


@pytest.mark.parametrize("encoder", ["resnet18", "tu-resnet18"])
def test_mixstyle_hooks_the_stride_4_8_16_stages(encoder) -> None:
    model = build_model(TrainConfig(encoder=encoder), in_channels=3, classes=3)
    found = stages(model.encoder)
    outputs = []
    handles = [s.register_forward_hook(lambda m, i, o: outputs.append(o.shape[-1])) for s in found]
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, 3, 64, 64))
    for handle in handles:
        handle.remove()
    assert outputs == [16, 8, 4]  # 64 px at strides 4, 8, 16


def test_an_encoder_mixstyle_cannot_hook_trains_without_it_and_says_so() -> None:
    model = build_model(TrainConfig(encoder="efficientnet-b0"), in_channels=3, classes=3)
    with pytest.warns(UserWarning, match="efficientnet-b0.*training without it"):
        assert attach(model, "efficientnet-b0", p=0.5, alpha=0.1, seed=0) is None
    assert not any(m._forward_hooks for m in model.modules())


def test_fit_with_mixstyle_saves_plain_weights_and_resumes(synth_dataset, tmp_path) -> None:
    from safetensors.torch import load_file

    from mlseg.model import load_model, load_train_state
    from mlseg.train import fit

    torch.set_num_threads(2)
    tiny = {"encoder": "resnet18", "patch_size": 64, "batch_size": 2, "warmup_steps": 1}

    def cfg(steps: int):
        train = {**tiny, "max_steps": steps, "val_every": 1, "mixstyle_p": 1.0}
        return load_config(None, train=train)

    out = tmp_path / "run"
    fit(cfg(2), synth_dataset, out, progress=False)
    state = load_train_state(out)
    assert state["mixstyle_rng"]["bit_generator"] == "PCG64"
    plain = build_model(TrainConfig(encoder="resnet18"), in_channels=3, classes=3)
    assert load_file(str(out / "last.safetensors")).keys() == plain.state_dict().keys()
    fit(cfg(3), synth_dataset, out, progress=False)
    assert load_train_state(out)["mixstyle_rng"] != state["mixstyle_rng"]  # draws went on
    loaded = load_model(out)
    assert loaded.meta["checkpoints"]["last"]["step"] == 3
    assert not any(s._forward_hooks for s in stages(loaded.model.encoder))


def test_mixstyle_under_torch_compile_draws_and_mixes_as_eager() -> None:
    """``train.compile``: the numpy draws break the graph but change nothing; the compiled
    network (traced by dynamo/AOTAutograd, no C++ toolchain needed) gives the eager output
    for the same draws and trains."""

    def styled_model(styled: bool = True) -> nn.Module:
        torch.manual_seed(0)
        model = build_model(TrainConfig(encoder="resnet18"), in_channels=3, classes=3)
        if styled:
            assert attach(model, "resnet18", p=1.0, alpha=0.1, seed=3) is not None
        return model.train()

    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    eager = styled_model()(x)
    compiled = torch.compile(styled_model(), backend="aot_eager")
    out = compiled(x)
    torch.testing.assert_close(out, eager)
    out.square().mean().backward()
    plain = styled_model(styled=False)(x)
    assert float((plain - eager).detach().abs().max()) > 1e-3  # the styles were mixed at all
