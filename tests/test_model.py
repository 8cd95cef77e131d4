"""Model building and checkpoints: smp models, safetensors, clear errors."""

from __future__ import annotations

import json
import re

import pytest
import torch

from mlseg.config import Config, TrainConfig
from mlseg.errors import ModelError
from mlseg.model import (
    build_model,
    check_trainable,
    load_model,
    load_train_state,
    nonfinite_tensors,
    save_checkpoint,
)

SMALL = TrainConfig(encoder="resnet18", encoder_depth=3, patch_size=64)


@pytest.fixture(autouse=True)
def _few_threads() -> None:
    torch.set_num_threads(1)


@pytest.mark.parametrize("classes", [1, 3])
def test_build_model_output_convention(classes: int) -> None:
    model = build_model(SMALL, in_channels=3, classes=classes).eval()
    with torch.no_grad():
        out = model(torch.rand(2, 3, 64, 64))
    assert out.shape == (2, classes, 64, 64)


def test_unknown_names_are_model_errors() -> None:
    with pytest.raises(ModelError, match="unknown architecture 'Unet3D'"):
        build_model(SMALL.model_copy(update={"arch": "Unet3D"}), 3, 1)
    with pytest.raises(ModelError, match="unknown encoder 'resnet35'"):
        build_model(SMALL.model_copy(update={"encoder": "resnet35"}), 3, 1)
    with pytest.raises(ModelError, match="encoder_weights"):
        build_model(SMALL.model_copy(update={"encoder_weights": "no-such-weights"}), 3, 1)


def test_an_unknown_timm_encoder_is_a_model_error_with_a_hint() -> None:
    """A misspelt 'tu-' name reached timm, whose RuntimeError ('Unknown model') came as a
    traceback after the data had been prepared."""
    with pytest.raises(ModelError, match=r"train.encoder: timm has no model 'resnet35'.*resnet34"):
        build_model(SMALL.model_copy(update={"encoder": "tu-resnet35"}), 3, 1)
    with pytest.raises(ModelError, match=r"did you mean resnet18"):
        build_model(SMALL.model_copy(update={"encoder": "resnet81"}), 3, 1)


def test_a_timm_encoder_from_a_local_folder_builds(tmp_path) -> None:
    """tu-local-dir:<folder> (timm's offline source, as tu-hf-hub:<repo> its hub's) was
    refused as a misspelt name, 'timm has no model', where smp builds it."""
    import timm

    try:
        timm_reads_folders = timm.models.parse_model_name("local-dir:x")[0] == "local-dir"
    except (AssertionError, ValueError):  # an older timm
        timm_reads_folders = False
    if not timm_reads_folders:
        pytest.skip(f"timm {timm.__version__} reads no local-dir: names")
    (tmp_path / "config.json").write_text(json.dumps({"architecture": "resnet18"}))
    cfg = SMALL.model_copy(update={"encoder": f"tu-local-dir:{tmp_path}", "encoder_weights": None})
    model = build_model(cfg, 3, 1)
    assert model.eval()(torch.zeros(1, 3, 64, 64)).shape == (1, 1, 64, 64)


def test_offline_encoder_weights_give_a_clear_error(monkeypatch) -> None:
    import segmentation_models_pytorch.encoders as encoders

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr(encoders, "hf_hub_download", offline)
    with pytest.raises(ModelError, match="offline.*encoder_weights: null"):
        build_model(SMALL.model_copy(update={"encoder_weights": "imagenet"}), 3, 1)


def _save(tmp_path, model, name="best", **extra):
    cfg = Config(train=SMALL)
    return save_checkpoint(
        tmp_path,
        model,
        cfg,
        target="three_class",
        classes=3,
        in_channels=3,
        fingerprint_hash="abc123",
        metrics={"val_dice": 0.5},
        pixel_size_um=0.5,
        name=name,
        step=7,
        **extra,
    )


@pytest.mark.parametrize("name", ["xpu", "meta", "mps"])
def test_a_device_torch_names_but_cannot_use_here_is_a_config_error(name) -> None:
    from mlseg.errors import ConfigError
    from mlseg.model import resolve_device

    if name == "mps" and torch.backends.mps.is_available():
        pytest.skip("MPS is available on this machine")
    with pytest.raises(ConfigError, match=rf"'{name}'.*use"):
        resolve_device(name)


def test_a_gpu_beyond_the_machines_count_is_a_config_error(tmp_path, monkeypatch) -> None:
    # cuda:1 on a one-GPU machine (a config.json from a two-GPU training box) was taken, and
    # the first upload failed with torch's "CUDA error: invalid device ordinal" traceback
    from mlseg.errors import ConfigError
    from mlseg.model import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("cuda:0") == torch.device("cuda:0")
    assert resolve_device("cuda") == torch.device("cuda")
    with pytest.raises(ConfigError, match=r"'cuda:1'.*shows 1 GPU .*use cuda:0, or auto"):
        resolve_device("cuda:1")
    with pytest.raises(ConfigError, match=r"config.json: the model's inference.device, 'cuda:1'"):
        resolve_device("cuda:1", saved_in=tmp_path / "config.json")


def test_checkpoint_round_trip(tmp_path) -> None:
    torch.manual_seed(0)
    model = build_model(SMALL, 3, 3).eval()
    path = _save(tmp_path, model)
    assert path.name == "best.safetensors"
    assert {p.name for p in tmp_path.iterdir()} == {"best.safetensors", "config.json", "meta.json"}
    loaded = load_model(tmp_path)
    assert (loaded.target, loaded.classes, loaded.in_channels, loaded.pixel_size_um) == (
        "three_class",
        3,
        3,
        0.5,
    )
    assert loaded.config.train.encoder == "resnet18" and not loaded.model.training
    assert loaded.meta["fingerprint_hash"] == "abc123"
    assert loaded.meta["checkpoints"]["best"]["step"] == 7
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(loaded.model(x), model(x), atol=1e-6)
    assert load_model(path).path == path  # a .safetensors file works too


def test_a_run_folder_loads_its_best_checkpoint_not_its_last(tmp_path) -> None:
    """A training run's folder holds best.safetensors and last.safetensors: the folder means
    the best; a mutant that tried last first (every segment and evaluate of a run folder on
    the latest epoch's weights) passed the tests."""
    torch.manual_seed(0)
    best = build_model(SMALL, 3, 3).eval()
    torch.manual_seed(1)
    _save(tmp_path, build_model(SMALL, 3, 3).eval(), name="last")
    _save(tmp_path, best, name="best")
    loaded = load_model(tmp_path)
    assert loaded.path.name == "best.safetensors"
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(loaded.model(x), best(x), atol=1e-6)


def test_weights_holding_nan_are_refused_naming_the_file_and_tensor(tmp_path) -> None:
    # a diverged training's weights: segment and evaluate found no nucleus with them, silently
    model = build_model(SMALL, 3, 3).eval()
    with torch.no_grad():
        model.segmentation_head[0].bias[1] = float("nan")
    path = _save(tmp_path, model, name="last")
    with pytest.raises(
        ModelError, match=r"last\.safetensors: 1 of its .* NaN .*segmentation_head\.0\.bias"
    ):
        load_model(path)


def test_nonfinite_tensors_names_nan_and_infinities_in_any_float_dtype_only() -> None:
    # read off each tensor's extremes: a sum would overflow a half tensor of finite weights
    # (1e5 x 1.0 in float16) and call it infinite; integer buffers and empty tensors pass
    state = {
        "half": torch.ones(100_000, dtype=torch.float16),
        "nan": torch.tensor([1.0, float("nan"), 2.0]),
        "inf": torch.tensor([1.0, float("inf")], dtype=torch.bfloat16),
        "minus_inf": torch.tensor([float("-inf"), 0.0], dtype=torch.float64),
        "empty": torch.zeros(0),
        "num_batches_tracked": torch.tensor(7),
    }
    assert nonfinite_tensors(state) == ["nan", "inf", "minus_inf"]


def test_last_checkpoint_keeps_train_state_without_pickle(tmp_path) -> None:
    model = build_model(SMALL, 3, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.rand(1, 3, 64, 64)).sum().backward()
    opt.step()
    state = {"optimizer": opt.state_dict(), "step": 3, "generator": torch.Generator().get_state()}
    _save(tmp_path, model, name="last", train_state=state)
    _save(tmp_path, model, name="best")
    back = load_train_state(tmp_path)  # torch.load(weights_only=True) inside
    assert back["step"] == 3 and "state" in back["optimizer"]
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert set(meta["checkpoints"]) == {"best", "last"}


def test_a_checkpoint_the_disk_cannot_hold_names_the_file(tmp_path) -> None:
    """torch.save says "unexpected pos 80011072 vs 80010960" when the disk fills: the user
    is told which file could not be written and why, and the weights and optimiser state of
    the last checkpoint are still each other's."""
    from mlseg.errors import OutputError

    resource = pytest.importorskip("resource")
    model = build_model(SMALL, 3, 3)
    weights = _save(tmp_path, model, name="last", train_state={"step": 2})
    before = weights.read_bytes()
    with torch.no_grad():  # the next step's weights
        next(model.parameters()).add_(1.0)
    state = {"step": 3, "moments": torch.zeros(weights.stat().st_size // 2)}  # as AdamW's: 2x
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (weights.stat().st_size + (1 << 16), hard))
    try:
        with pytest.raises(OutputError, match=r"last\.state\.pt: cannot be written \(file too"):
            _save(tmp_path, model, name="last", train_state=state)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert not [p.name for p in tmp_path.iterdir() if ".tmp" in p.name]
    # the last pair stays a pair: a resume must not train step 3's weights from step 2's state
    assert weights.read_bytes() == before and load_train_state(tmp_path)["step"] == 2


def test_only_a_stain_reference_the_preprocessing_reads_is_copied_in(tmp_path) -> None:
    """A run config naming a file as preprocess.stain_reference beside stain_norm: none (a
    key file, /proc/self/environ): it was copied into the checkpoint all the same, and the
    registry copied it on."""
    from mlseg.config import PreprocessConfig, get_profile

    secret = tmp_path / "secrets.env"
    secret.write_text("AWS_SECRET_ACCESS_KEY=not-for-the-checkpoint")
    pre = PreprocessConfig(stain_norm="none", stain_reference=secret)
    ckpt = tmp_path / "ckpt"
    save_checkpoint(
        ckpt, build_model(SMALL, 3, 3), Config(train=SMALL, preprocess=pre), target="three_class",
        classes=3, in_channels=3, fingerprint_hash=None, metrics={}, pixel_size_um=None,
        name="best", profile=get_profile("he"),
    )  # fmt: skip
    meta = json.loads((ckpt / "meta.json").read_text())
    copies = sorted(p.name for p in ckpt.glob("stain_reference*"))
    assert copies == [] and "stain_reference_file" not in meta


def test_a_stain_reference_that_is_no_image_is_never_copied_in(tmp_path) -> None:
    """Normalisation reads the reference (training fails on a file that is no image before
    any checkpoint): a key file named as one is refused, not copied next to the weights."""
    from mlseg.config import PreprocessConfig
    from mlseg.errors import ImageReadError

    secret = tmp_path / "secrets.png"
    secret.write_text("AWS_SECRET_ACCESS_KEY=not-for-the-checkpoint")
    pre = PreprocessConfig(stain_norm="macenko", stain_reference=secret)
    with pytest.raises(ImageReadError):
        save_checkpoint(
            tmp_path / "ckpt", build_model(SMALL, 3, 3), Config(train=SMALL, preprocess=pre),
            target="three_class", classes=3, in_channels=3, fingerprint_hash=None, metrics={},
            pixel_size_um=None, name="best",
        )  # fmt: skip
    assert not list((tmp_path / "ckpt").glob("stain_reference*"))


def test_the_stain_reference_copy_keeps_its_pixels_not_its_metadata(tmp_path) -> None:
    """A slide's TIFF names its patient, its scanner's user and host in its tags; the run's
    copy of it as stain reference was a byte copy, so a registered model, shared with
    another lab, carried them all. The copy holds the pixels alone."""
    import numpy as np
    import tifffile

    from mlseg.config import PreprocessConfig
    from mlseg.io import read_image
    from mlseg.model import saved_config

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (32, 40, 3), dtype=np.uint8)
    reference = tmp_path / "S22-01234_patientDoe.tif"
    tifffile.imwrite(
        reference, pixels, photometric="rgb", description="Patient: Jane Roe; MRN 998877",
        extratags=[(315, "s", 0, "jdoe", True), (316, "s", 0, "path-lab-ws17", True)],
    )  # fmt: skip
    pre = PreprocessConfig(stain_norm="macenko", stain_reference=reference)
    ckpt = tmp_path / "ckpt"
    save_checkpoint(
        ckpt, build_model(SMALL, 3, 3), Config(train=SMALL, preprocess=pre), target="three_class",
        classes=3, in_channels=3, fingerprint_hash=None, metrics={}, pixel_size_um=None,
        name="best",
    )  # fmt: skip
    (copy,) = ckpt.glob("stain_reference*")
    assert json.loads((ckpt / "meta.json").read_text())["stain_reference_file"] == copy.name
    for said in (b"Jane Roe", b"998877", b"jdoe", b"path-lab-ws17"):
        assert said not in copy.read_bytes()
    # the model normalises to the same pixels as before
    assert saved_config(ckpt).preprocess.stain_reference == (ckpt / copy.name).absolute()
    assert np.array_equal(read_image(copy), read_image(reference))


@pytest.mark.parametrize("stain, outside", [("fluorescence", 0), ("he", 255)])
def test_the_stain_reference_copy_is_read_as_training_reads_it(tmp_path, stain, outside) -> None:
    """The copy segment normalises to holds the reference as training read it: an RGBA
    reference's transparent outside black for fluorescence (it was copied white, saturated
    signal), white for bright field as before."""
    import cv2
    import numpy as np

    from mlseg.config import PreprocessConfig
    from mlseg.io import read_image

    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[:, :4] = (60, 120, 90, 255)
    cv2.imwrite(str(tmp_path / "ref.png"), cv2.cvtColor(rgba, cv2.COLOR_RGBA2BGRA))
    pre = PreprocessConfig(equalize="match", stain_reference=tmp_path / "ref.png")
    ckpt = tmp_path / "ckpt"
    save_checkpoint(
        ckpt, build_model(SMALL, 3, 3), Config(train=SMALL, preprocess=pre), target="three_class",
        classes=3, in_channels=3, fingerprint_hash=None, metrics={}, pixel_size_um=None,
        name="best", stain=stain,
    )  # fmt: skip
    copy = read_image(ckpt / "stain_reference.png")
    assert (copy[:, :4] == (60, 120, 90)).all() and (copy[:, 4:] == outside).all()


def test_weights_saved_from_a_compiled_model_load_and_predict_as_eager(tmp_path) -> None:
    # torch.compile's wrapper names every key _orig_mod.<key>: a GPU run's compiled model
    # saved by hand was refused as weights "of another architecture or edited"
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = build_model(SMALL, 3, 3).eval()
    _save(tmp_path, model)
    compiled = torch.compile(model)  # its state_dict only: nothing is compiled
    assert all(k.startswith("_orig_mod.") for k in compiled.state_dict())
    save_file(compiled.state_dict(), str(tmp_path / "best.safetensors"))
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(load_model(tmp_path).model(x), model(x))


def test_a_saved_profile_this_mlseg_cannot_read_names_the_models_meta_json(tmp_path) -> None:
    # a model from an mlseg whose profiles have a setting this one lacks said only
    # "meta.json (profile_settings): unknown key ...", not which model's
    from mlseg.config import get_profile
    from mlseg.errors import ConfigError

    _save(tmp_path, build_model(SMALL, 3, 3), profile=get_profile("he"))
    meta = json.loads((tmp_path / "meta.json").read_text())
    meta["profile_settings"]["newer_setting"] = 1
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    loaded = load_model(tmp_path)  # its weights and config are read as they were
    with pytest.raises(ConfigError, match=re.escape(f"{tmp_path / 'meta.json'} (profile_")):
        _ = loaded.profile


@pytest.mark.parametrize(
    ("key", "value"), [("min_distance_um", 50_000.0), ("min_distance_px", 100_000)]
)
def test_a_saved_profile_with_a_seed_spacing_no_nucleus_has_is_refused(
    tmp_path, key, value
) -> None:
    """A binary model from elsewhere whose saved profile spaces watershed seeds 50,000 um
    apart made evaluate ask OpenCV for a 40 GB dilation kernel (a traceback, 'Failed to
    allocate 40000400001 bytes'), 100,000 px (pixel size unknown) the same: refused when
    the profile is read, naming the model's meta.json and the setting."""
    from mlseg.config import get_profile
    from mlseg.errors import ConfigError

    _save(tmp_path, build_model(SMALL, 3, 3), profile=get_profile("he"))
    meta = json.loads((tmp_path / "meta.json").read_text())
    meta["profile_settings"]["watershed"][key] = value
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    loaded = load_model(tmp_path)
    with pytest.raises(
        ConfigError, match=re.escape(f"(profile_settings): bad value for 'watershed.{key}'")
    ):
        _ = loaded.profile


def test_checkpoint_of_another_architecture_is_refused(tmp_path) -> None:
    _save(tmp_path, build_model(SMALL, 3, 3))
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["train"]["encoder"] = "resnet34"  # weights are resnet18's
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match=r"best\.safetensors: weights do not fit Unet/resnet34"):
        load_model(tmp_path)


def test_weights_of_another_encoder_are_refused_in_a_few_lines(tmp_path) -> None:
    # torch's message lists every key: a resnet18 file under a resnet34 config was refused
    # in 2,900 characters of key names
    _save(tmp_path, build_model(SMALL, 3, 3))
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["train"]["encoder"] = "resnet34"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError) as err:
        load_model(tmp_path)
    said = str(err.value)
    assert len(said) < 600, said
    assert "key(s) missing: encoder.layer1.2.conv1.weight" in said
    assert "another architecture or was edited" in said


def test_missing_or_damaged_checkpoints(tmp_path) -> None:
    # a mistyped run folder is named as missing, not as a path of the wrong kind
    with pytest.raises(ModelError, match=r"runs/trian: not found; give the training run's"):
        load_model(tmp_path / "runs" / "trian")
    with pytest.raises(ModelError, match="no best.safetensors"):
        load_model(tmp_path)
    (tmp_path / "best.safetensors").write_bytes(b"not a tensor file")
    (tmp_path / "config.json").write_text(Config(train=SMALL).model_dump_json())
    (tmp_path / "meta.json").write_text(
        json.dumps({"target": "binary", "classes": 1, "in_channels": 3})
    )
    with pytest.raises(ModelError, match="not a readable safetensors"):
        load_model(tmp_path)
    (tmp_path / "meta.json").write_text("{")
    with pytest.raises(ModelError, match="damaged"):
        load_model(tmp_path)


@pytest.mark.parametrize(
    "content",
    [b"\xff\xfe{}", b"[" * 100_000, b"[1, 2]", b"null"],
    ids=["not-utf8", "nested-too-deep", "a-list", "null"],
)
@pytest.mark.parametrize("name", ["meta.json", "config.json"])
def test_a_checkpoint_with_an_unreadable_json_file_is_named_as_damaged(
    tmp_path, name, content
) -> None:
    """A checkpoint from someone else whose JSON is cut, re-encoded or crafted: one line
    naming the file, not a traceback from deep in the loader."""
    folder = _save(tmp_path / "model", build_model(SMALL, 3, 3)).parent
    (folder / name).write_bytes(content)
    with pytest.raises(ModelError, match=rf"{name}: .*the checkpoint is damaged"):
        load_model(folder)


@pytest.mark.parametrize("channels", [0, -3, 100_000_000])
def test_a_checkpoint_whose_meta_json_names_absurd_input_channels_is_refused_first(
    tmp_path, channels, monkeypatch
) -> None:
    """A model file from someone else with in_channels 100000000 in its meta.json had 1.2 TB
    asked for its first layer (a torch allocation error, or the machine's memory), -3 gave a
    torch RuntimeError and 0 blamed the encoder depth: refused, naming the file, unbuilt."""
    import mlseg.model as model_module

    folder = _save(tmp_path / "model", build_model(SMALL, 3, 3)).parent
    meta = json.loads((folder / "meta.json").read_text())
    (folder / "meta.json").write_text(json.dumps({**meta, "in_channels": channels}))

    def built(*args, **kwargs):
        raise AssertionError("a model was built")

    monkeypatch.setattr(model_module, "build_model", built)
    with pytest.raises(ModelError, match=rf"meta.json: in_channels {channels} is not a model"):
        load_model(folder)


@pytest.mark.parametrize("name", ["meta.json", "config.json", "best.safetensors"])
def test_a_checkpoint_file_one_may_not_read_is_named_with_the_fix(
    tmp_path, name, monkeypatch
) -> None:
    """A colleague's run saved under umask 077: its JSON read as 'the checkpoint is damaged'
    and its weights as 'No such file or directory' (safetensors' word for any file it cannot
    open), of files that ls shows."""
    from pathlib import Path

    import safetensors.torch

    folder = _save(tmp_path / "model", build_model(SMALL, 3, 3)).parent
    denied, path_open, load_file = folder / name, Path.open, safetensors.torch.load_file

    def open_(self, *args, **kwargs):  # as for a user without read access (tests run as root)
        if self == denied:
            raise PermissionError(13, "Permission denied", str(self))
        return path_open(self, *args, **kwargs)

    def load(filename, *args, **kwargs):  # safetensors names no cause
        if Path(filename) == denied:
            raise FileNotFoundError(f"No such file or directory: {filename}")
        return load_file(filename, *args, **kwargs)

    monkeypatch.setattr(Path, "open", open_)
    monkeypatch.setattr(safetensors.torch, "load_file", load)
    with pytest.raises(ModelError) as err:
        load_model(folder)
    assert (
        str(err.value)
        == f"{denied}: cannot be read (permission denied); make it readable (chmod a+r)"
    )


@pytest.mark.parametrize(("arch", "depth"), [("FPN", 3), ("FPN", 4), ("PSPNet", 5), ("PSPNet", 4)])
def test_decoders_that_upsample_at_the_end_fit_the_input_at_any_depth(arch, depth) -> None:
    """FPN and PSPNet upsample by a factor made for their default depth: at another depth
    the output was 4x the input (FPN, depth 3) or a quarter of it (PSPNet, depth 5), and
    training failed at its first loss."""
    model = build_model(TrainConfig(arch=arch, encoder="resnet18", encoder_depth=depth), 3, 3)
    with torch.no_grad():
        assert model.eval()(torch.zeros(1, 3, 128, 128)).shape[-2:] == (128, 128)


@pytest.mark.parametrize(
    ("train", "said"),
    [
        ({"arch": "PAN", "patch_size": 64}, r"train.patch_size=64: PAN/resnet18 .*\(128 runs"),
        ({"arch": "DeepLabV3Plus", "batch_size": 1}, r"train.batch_size=1: .*2 or more"),
        ({"patch_size": 32, "batch_size": 1}, r"train.batch_size=1: Unet/resnet18"),
    ],
)
def test_patches_or_batches_a_model_cannot_train_on_are_refused(train, said) -> None:
    """They failed at the first training step with torch's 'Output size is too small' or
    'Expected more than 1 value per channel when training'."""
    cfg = TrainConfig(encoder="resnet18", **train)
    model = build_model(cfg, 3, 3)
    kept = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ModelError, match=said):
        check_trainable(model, cfg, 3)
    assert all(torch.equal(v, kept[k]) for k, v in model.state_dict().items())
    check_trainable(model, cfg.model_copy(update={"patch_size": 128, "batch_size": 2}), 3)


def test_a_model_whose_output_misses_the_input_size_is_refused(monkeypatch) -> None:
    import segmentation_models_pytorch as smp

    real = smp.create_model

    def shrunk(*args, **kwargs):
        return torch.nn.Sequential(real(*args, **kwargs), torch.nn.AvgPool2d(2))

    monkeypatch.setattr(smp, "create_model", shrunk)
    with pytest.raises(ModelError, match=r"gives a 64x64 output for a 128x128 input"):
        build_model(TrainConfig(encoder="resnet18", encoder_depth=3), 3, 3)


def test_a_checkpoint_whose_target_contradicts_its_classes_is_refused(tmp_path) -> None:
    folder = _save(tmp_path / "model", build_model(SMALL, 3, 3)).parent
    meta = json.loads((folder / "meta.json").read_text())
    (folder / "meta.json").write_text(json.dumps({**meta, "target": "binary"}))
    with pytest.raises(ModelError, match=r"target 'binary' with 3 classes is not a model"):
        load_model(folder)


def test_a_meta_json_count_that_is_no_number_is_named_as_such(tmp_path) -> None:
    """``"classes": "three"`` was reported as 'lacks invalid literal for int() with base
    10: 'three''; the error now names both counts and says the file was edited."""
    folder = _save(tmp_path / "model", build_model(SMALL, 3, 3)).parent
    meta = json.loads((folder / "meta.json").read_text())
    for edit in ({"classes": "three"}, {"in_channels": None}):
        (folder / "meta.json").write_text(json.dumps({**meta, **edit}))
        with pytest.raises(ModelError, match=r"meta\.json: classes .* must be whole numbers"):
            load_model(folder)


@pytest.mark.parametrize(("capability", "dtype"), [((7, 5), None), ((8, 0), torch.bfloat16)])
def test_a_gpu_without_bf16_in_hardware_runs_in_float32_and_says_so(
    monkeypatch, capability, dtype
) -> None:
    """On a GPU before Ampere (T4 7.5, V100 7.0) bf16 autocast is emulated, slower than
    float32, and cuDNN has no bf16 convolutions for it: float32 there, with one warning;
    Ampere and later keep bf16."""
    import warnings

    from mlseg.errors import warn_once
    from mlseg.model import autocast_dtype

    warn_once.cache_clear()
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.version, "hip", None)
    cuda = torch.device("cuda")
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        assert autocast_dtype(cuda, True) is dtype
        assert autocast_dtype(cuda, True) is dtype  # once per run, not once per image
        assert autocast_dtype(cuda, False) is None
    messages = [str(w.message) for w in said]
    if dtype is None:
        assert len(messages) == 1 and "compute capability 7.5" in messages[0], messages
        assert "float32" in messages[0]
    else:
        assert messages == []


@pytest.mark.parametrize(
    ("stain", "stain_norm", "ihc_dab"),
    [("ihc", "macenko", "eosin"), ("he", "macenko", "nucleus"), ("ihc", "none", "nucleus")],
)
def test_a_config_saved_before_ihc_dab_loads_with_the_mapping_it_trained_with(
    tmp_path, stain, stain_norm, ihc_dab
) -> None:
    """A Macenko model trained on IHC by an mlseg before preprocess.ihc_dab put DAB in
    eosin's place alone; its config.json, without the key, loaded with today's default
    ("nucleus"), so its inputs were prepared otherwise than it learnt (on a synthetic IHC
    tile 23% of the pixels moved, by up to 0.73). An H&E model never saw DAB: it keeps the
    default, as does an IHC model without Macenko, where the key does nothing."""
    from mlseg.model import saved_config

    config = Config(profile=stain).model_dump(mode="json")
    del config["preprocess"]["ihc_dab"]
    config["preprocess"]["stain_norm"] = stain_norm
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "meta.json").write_text(json.dumps({"profile": stain, "stain": stain}))
    assert saved_config(tmp_path).preprocess.ihc_dab == ihc_dab
    # a config that names the key keeps it
    config["preprocess"]["ihc_dab"] = "nucleus"
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert saved_config(tmp_path).preprocess.ihc_dab == "nucleus"
