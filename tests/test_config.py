import re
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from mlseg.config import (
    Config,
    Profile,
    default_profiles_path,
    get_profile,
    load_config,
    load_profiles,
)
from mlseg.errors import ConfigError


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_defaults_are_valid_and_frozen():
    cfg = load_config()
    assert isinstance(cfg, Config)
    assert cfg.train.encoder_weights is None  # no model hub offline
    with pytest.raises(ValidationError):
        cfg.train.lr = 1.0  # type: ignore[misc]


def test_yaml_values_and_overrides_merge(tmp_path):
    path = write(
        tmp_path / "c.yaml", "train:\n  lr: 0.01\n  batch_size: 4\ndata:\n  mask_suffix: _seg\n"
    )
    cfg = load_config(path, train={"batch_size": 2})
    assert cfg.train.lr == 0.01
    assert cfg.train.batch_size == 2  # override wins, other keys kept
    assert cfg.data.mask_suffix == "_seg"


def test_a_bad_override_is_not_blamed_on_the_file(tmp_path):
    """mlseg train --max-steps 0 and a flow's overrides {"train": {"max_stesp": 3}} said the
    config file held the bad value or unknown key, which the file did not have."""
    path = write(tmp_path / "c.yaml", "train:\n  lr: 0.01\n")
    with pytest.raises(ConfigError, match=r"c\.yaml with overrides: bad value for 'train\.max"):
        load_config(path, train={"max_steps": 0})
    with pytest.raises(ConfigError, match=r"c\.yaml with overrides: unknown key 'train\.max_"):
        load_config(path, train={"max_stesp": 3})


def test_unknown_key_names_key_and_file(tmp_path):
    path = write(tmp_path / "bad.yaml", "train:\n  lrr: 0.01\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "train.lrr" in str(err.value) and "bad.yaml" in str(err.value)


def test_bad_value_names_key_and_file(tmp_path):
    path = write(tmp_path / "bad.yaml", "train:\n  patch_size: 100\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "train.patch_size" in str(err.value) and "multiple of 32" in str(err.value)


def test_stain_tta_gains_are_checked(tmp_path):
    path = write(tmp_path / "bad.yaml", "inference:\n  stain_tta: [1.0, 0]\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "inference.stain_tta" in str(err.value) and "[0.25, 4]" in str(err.value)
    assert load_config(None, inference={"stain_tta": [1.0]}).inference.stain_tta == (1.0,)


def test_patch_shares_over_one_are_refused(tmp_path):
    path = write(tmp_path / "bad.yaml", "train:\n  fg_oversample: 0.9\n  faint_oversample: 0.2\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "faint_oversample" in str(err.value) and "bad.yaml" in str(err.value)
    # shares of the same patches may fill them: a mutant refusing a sum of exactly 1 passed
    shares = load_config(None, train={"fg_oversample": 0.5, "faint_oversample": 0.5}).train
    assert shares.fg_oversample + shares.faint_oversample == 1


@pytest.mark.parametrize(
    ("section", "key", "value", "said"),
    [
        ("data", "val_fraction", 1.0, "less than 1"),  # every image but one held back
        ("data", "train_dir", "train\\2024", "plain folder name"),  # a Windows path
        ("data", "image_dir", "images/raw", "plain folder name"),
        ("train", "patch_size", 48, "multiple of 32"),  # a multiple of 16: smp refuses it late
        ("augment", "scale_range", [0, 2.0], "0 < low <= high"),  # log(0): no zoom to draw
        ("augment", "scale_range", [2.0, 0.5], "0 < low <= high"),
        ("augment", "haematoxylin_gain", [0.0, 2.0], "0 < low <= high"),
        ("augment", "blur_sigma", [1.5, 0.5], "0 <= low <= high"),
        ("train", "encoder_depth", 2, "greater than or equal to 3"),
        ("inference", "overlap", 0.95, "less than 0.9"),  # a tile step of a few pixels
        ("inference", "stain_tta", [1.0, 4.5], r"\[0\.25, 4\]"),
    ],
)
def test_values_outside_their_documented_range_are_refused(tmp_path, section, key, value, said):
    """Mutants of mlseg/config.py that dropped each of these limits passed the tests: a run
    config with them loaded, and failed (or trained otherwise than written) much later."""
    path = write(tmp_path / "c.yaml", yaml.safe_dump({section: {key: value}}))
    with pytest.raises(ConfigError, match=rf"c\.yaml: bad value for '{section}\.{key}'.*{said}"):
        load_config(path)


def test_mixstyle_on_batches_of_one_patch_is_refused(tmp_path):
    """MixStyle mixes a patch's style with another's of its batch: at batch_size 1 it never
    acted, and the run trained without it, without a word."""
    path = write(tmp_path / "bad.yaml", "train:\n  mixstyle_p: 0.5\n  batch_size: 1\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "mixstyle_p" in str(err.value) and "batch_size" in str(err.value)
    assert "bad.yaml" in str(err.value)
    assert load_config(None, train={"mixstyle_p": 0.5, "batch_size": 2}).train.batch_size == 2
    assert load_config(None, train={"batch_size": 1}).train.mixstyle_p == 0


def test_unknown_top_level_section(tmp_path):
    path = write(tmp_path / "bad.yaml", "trainer: {}\n")
    with pytest.raises(ConfigError, match="unknown key 'trainer'; did you mean 'train'?"):
        load_config(path)


def test_a_misspelt_key_is_refused_with_the_nearest_one(tmp_path):
    """A misspelt key was refused by name alone, leaving the user to look the spelling up."""
    path = write(tmp_path / "bad.yaml", "train:\n  max_stpes: 5\n  zzz: 1\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    said = str(err.value).splitlines()
    assert "unknown key 'train.max_stpes'; did you mean 'train.max_steps'?" in said[0]
    assert said[1].endswith("unknown key 'train.zzz'; remove it or check its spelling")
    with pytest.raises(
        ConfigError, match=r"'lab'\): unknown key 'pixel_size_mu'; did you mean 'pi"
    ):
        load_profiles(write(tmp_path / "p.yaml", "profiles:\n  lab: {pixel_size_mu: 0.5}\n"))


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path / "broken.yaml", "train: [unclosed\n"))


def test_packaged_profiles():
    profiles = load_profiles()
    assert {"he", "ihc", "fluorescence"} <= set(profiles)
    assert profiles["ihc"].stain == "ihc"
    assert all(p.version for p in profiles.values())


def test_run_config_preprocess_overrides_the_profile_key_by_key(tmp_path):
    from mlseg.data import effective_preprocess

    he = get_profile("he")
    assert he.preprocess.stain_norm == "macenko"
    assert effective_preprocess(load_config(), he) == he.preprocess
    # setting the training pixel size must not silently drop the profile's stain norm
    scaled = effective_preprocess(load_config(preprocess={"target_pixel_size_um": 0.5}), he)
    assert (scaled.target_pixel_size_um, scaled.stain_norm) == (0.5, "macenko")
    path = write(tmp_path / "c.yaml", "preprocess:\n  stain_norm: none\n")
    assert effective_preprocess(load_config(path), he).stain_norm == "none"


def test_unknown_profile_lists_known_ones():
    with pytest.raises(ConfigError) as err:
        get_profile("hematoxylin")
    assert "he" in str(err.value) and "fluorescence" in str(err.value)


def test_profile_errors_name_profile_and_key(tmp_path):
    path = write(tmp_path / "p.yaml", "profiles:\n  mine:\n    pixel_size_um: -1\n")
    with pytest.raises(ConfigError) as err:
        load_profiles(path)
    assert "mine" in str(err.value) and "pixel_size_um" in str(err.value)


@pytest.mark.parametrize(
    ("settings", "said"),
    [
        ({"dab_thresholds": [0.3, 0.3, 0.6]}, "dab_thresholds must be increasing"),
        ({"min_area_um2": 50, "max_area_um2": 50}, "min_area_um2 must be below"),
        ({"stain_names": ["Hematoxylin", "eosin", "dab"]}, "must be a lower-case identifier"),
        ({"stain_names": ["hematoxylin", "eosin", "eosin"]}, "stain names must differ"),
        ({"stain": "ihc", "stain_names": ["hematoxylin", "eosin", "brown"]}, "name its DAB"),
        ({"stain_vectors": [[1, 0, 0], [2, 0, 0], [0, 0, 1]]}, "linearly dependent"),
    ],
)
def test_a_profile_that_would_measure_nonsense_is_refused(tmp_path, settings, said):
    """Mutants of mlseg/config.py that dropped each of these checks passed the tests: the
    profile loaded and graded, measured or unmixed by it (a DAB grade of no 2+, every nucleus
    refused by size, a stain column named twice, an unmixing matrix with no inverse)."""
    path = write(tmp_path / "p.yaml", yaml.safe_dump({"profiles": {"mine": settings}}))
    with pytest.raises(ConfigError, match=rf"p\.yaml \(profile 'mine'\).*{said}"):
        load_profiles(path)


def test_default_stain_vectors_give_spare_vectors_in_order():
    """Two names of no default stain take the spare vectors in their order (eosin, then
    DAB); a mutant taking them from the end measured an 'eos' column with DAB's vector."""
    from mlseg.config import DEFAULT_STAIN_VECTORS, default_stain_vectors

    hematoxylin, eosin, dab = DEFAULT_STAIN_VECTORS
    assert default_stain_vectors(("hematoxylin", "eos", "rest")) == [hematoxylin, eosin, dab]


@pytest.mark.parametrize("value", ["250", "0.00025"])  # nanometres, millimetres
def test_a_pixel_size_in_the_wrong_unit_is_refused(tmp_path, value):
    config = write(tmp_path / "c.yaml", f"preprocess:\n  target_pixel_size_um: {value}\n")
    with pytest.raises(ConfigError, match=r"target_pixel_size_um.*outside 0.01-10"):
        load_config(config)
    profiles = write(tmp_path / "p.yaml", f"profiles:\n  mine:\n    pixel_size_um: {value}\n")
    with pytest.raises(ConfigError, match=r"mine.*pixel_size_um.*outside 0.01-10"):
        load_profiles(profiles)


def test_an_empty_config_is_the_defaults_and_other_files_are_named_not_a_traceback(tmp_path):
    """A run config with nothing in it (every line commented out) is the defaults; a list, or
    a file saved in Latin-1 (a Windows editor), is refused naming the file, its line and the
    fix (it had said 'not valid YAML (utf-8 codec...); give a YAML config file'). Mutants that
    dropped each of these checks read None and refused it, or ended in a traceback
    ('list' object has no attribute 'items', UnicodeDecodeError)."""
    assert load_config(write(tmp_path / "empty.yaml", "# train: {max_steps: 5}\n")) == Config()
    with pytest.raises(ConfigError, match=r"list\.yaml: top level must be a mapping"):
        load_config(write(tmp_path / "list.yaml", "- train\n- data\n"))
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("train: {max_steps: 5}\n# r\xe9glages du labo\n".encode("latin-1"))
    # it is YAML, in Latin-1: the line and the fix, not "not valid YAML; give a YAML file"
    with pytest.raises(ConfigError, match=r"latin1\.yaml: line 2 is not UTF-8.*save it as UTF-8"):
        load_config(latin1)
    profiles = tmp_path / "profiles.yaml"
    profiles.write_bytes("profiles:\n  caf\xe9: {pixel_size_um: 0.5}\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"profiles\.yaml: line 2 is not UTF-8.*save it as UTF-8"):
        load_profiles(profiles)


def test_a_profile_is_named_by_its_key(tmp_path):
    """A ``name:`` inside a profile does not rename it: the name a run records is the one it
    was chosen by (--profile lab)."""
    path = write(tmp_path / "p.yaml", "profiles:\n  lab: {name: other, pixel_size_um: 0.5}\n")
    assert get_profile("lab", path).name == "lab"


def test_a_section_with_every_key_commented_out_is_empty_not_a_crash(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("train:\n  # lr: 1e-3\n")
    cfg = load_config(path, train={"max_steps": 2})
    assert cfg.train.max_steps == 2 and cfg.train.lr == Config().train.lr


def test_the_config_json_saved_beside_the_weights_loads_as_a_run_config(tmp_path):
    # a ResumeError says "give the settings it was trained with (its config.json)": that file
    # holds profiles_file: null, which must stay null, not become an empty section
    saved = Config().model_copy(update={"train": Config().train.model_copy(update={"lr": 0.01})})
    path = write(tmp_path / "config.json", saved.model_dump_json(indent=2))
    assert load_config(path) == saved
    with pytest.raises(ConfigError, match=r"'profile'"):
        load_config(write(tmp_path / "c.yaml", "profile:\n"))


def test_a_profile_that_is_not_a_mapping_is_named(tmp_path):
    path = tmp_path / "profiles.yaml"
    path.write_text("profiles:\n  he: 3\n")
    with pytest.raises(ConfigError, match=r"profiles\.yaml: profile 'he' must be a mapping"):
        load_profiles(path)


def test_a_profile_version_written_as_a_number_is_taken(tmp_path):
    path = tmp_path / "profiles.yaml"
    path.write_text("profiles:\n  lab:\n    version: 5\n    pixel_size_um: 0.25\n")
    assert load_profiles(path)["lab"].version == "5"


@pytest.mark.parametrize("written", ["1.10", "010", "2.0"])
def test_a_profile_version_written_as_a_number_is_kept_as_written(tmp_path, written):
    """YAML read `version: 1.10` as the float 1.1 and 010 as the octal 8: every run
    recorded another version than the profile's file says."""
    path = write(tmp_path / "p.yaml", f"profiles:\n  lab: {{version: {written}}}\n")
    assert load_profiles(path)["lab"].version == written


def test_readme_config_examples_load_and_name_real_keys(tmp_path):
    """Every YAML example of the README (blocks and one-line `section: {...}`) loads, and
    every `section.key` it names is a key of that section: the README is how users write
    their run configs."""
    root = Path(__file__).resolve().parents[1]
    text = (root / "README.md").read_text(encoding="utf-8")
    sections = {name: field.annotation for name, field in Config.model_fields.items()}
    examples = re.findall(r"```yaml\n(.*?)```", text, re.S) + re.findall(
        rf"`((?:{'|'.join(sections)}): \{{[^`]*\}})`", text
    )
    assert len(examples) >= 4
    for i, example in enumerate(examples):
        path = tmp_path / f"example{i}.yaml"
        path.write_text(example)
        load_config(path)
    named = set(re.findall(rf"`({'|'.join(sections)})\.(\w+)`", text))
    assert len(named) >= 20
    for section, key in named:
        fields = getattr(sections[section], "model_fields", {})
        assert key in fields, f"README names {section}.{key}, which the config does not have"


def test_a_missing_profiles_file_is_named_as_one(tmp_path, monkeypatch):
    """A model trained with a relative profiles_file, evaluated from another folder, failed
    with 'config file not found', naming neither the profiles file nor where it was looked."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"lab\.yaml: profiles file not found.*profiles_file"):
        get_profile("lab", "lab.yaml")


@pytest.mark.parametrize("percentiles", ["[99, 1]", "[5, 5]", "[1, 199]", "[-1, 99]"])
def test_intensity_percentiles_out_of_order_or_range_are_refused(tmp_path, percentiles):
    """(99, 1) divided by the 1e-6 floor of a negative spread (values of -1e6) and (1, 199)
    was numpy's traceback in the middle of training."""
    path = write(tmp_path / "c.yaml", f"preprocess: {{percentiles: {percentiles}}}\n")
    with pytest.raises(ConfigError, match=r"preprocess\.percentiles.*0 <= low < high <= 100"):
        load_config(path)


def test_a_key_written_twice_is_refused_not_the_last_kept(tmp_path):
    """PyYAML keeps the last of two equal keys: a second `train:` section dropped the lr of
    the first, and a lab's profile written twice lost its pixel size, without a word."""
    path = write(tmp_path / "c.yaml", "train:\n  lr: 0.01\ndata: {}\ntrain:\n  max_steps: 5\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: 'train' is written twice \(lines 1 and 4\)"):
        load_config(path)
    path = write(tmp_path / "p.yaml", "profiles:\n  lab: {pixel_size_um: 0.25}\n  lab: {}\n")
    with pytest.raises(ConfigError, match=r"p\.yaml: 'lab' is written twice"):
        load_profiles(path)
    # a key of a merged profile (`<<: *he`) may still be set again
    path = write(
        tmp_path / "m.yaml",
        "profiles:\n  he: &he {min_area_px: 5}\n  lab: {<<: *he, min_area_px: 7}\n",
    )
    assert load_profiles(path)["lab"].min_area_px == 7


def test_yes_no_on_off_are_refused_where_a_key_takes_no_true_or_false(tmp_path):
    """YAML 1.1 reads an unquoted on/off/yes/no as true/false, and pydantic took true as 1.0:
    `elastic_p: on` warped every patch without a word; `mask_suffix: no` said only 'Input
    should be a valid string' of a value the user wrote as a string."""
    path = write(tmp_path / "c.yaml", "augment: {elastic_p: on}\n")
    with pytest.raises(ConfigError, match=r"augment\.elastic_p': .*got true.*unquoted yes, no"):
        load_config(path)
    path = write(tmp_path / "c.yaml", "data: {mask_suffix: no}\n")
    with pytest.raises(ConfigError, match=r"data\.mask_suffix': .*got false"):
        load_config(path)
    path = write(tmp_path / "c.yaml", "train: {amp: off}\ninference: {tta: yes}\n")
    cfg = load_config(path)
    assert cfg.train.amp is False and cfg.inference.tta is True


def test_a_number_with_a_leading_zero_is_refused_not_read_as_octal(tmp_path):
    """YAML 1.1 reads 0640 as the octal 416: `tile_size: 0640` predicted on 416 px tiles."""
    path = write(tmp_path / "c.yaml", "train: {seed: 7}\ninference:\n  tile_size: 0640\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: line 3: YAML reads 0640 as the octal number"):
        load_config(path)


def test_a_whole_number_in_exponent_form_is_named_as_read_as_text(tmp_path):
    """YAML 1.1 reads 1e3 (no dot, no exponent sign) as text: `max_steps: 1e3` was
    refused as 'unable to parse string as an integer', which the 1e3 written does not
    explain; the message says it was read as text and what to write."""
    path = write(tmp_path / "c.yaml", "train:\n  max_steps: 1e3\n")
    with pytest.raises(
        ConfigError, match=r"'train.max_steps': 1e3 was read as text, not a number; write 1000$"
    ):
        load_config(path)
    path = write(tmp_path / "c.yaml", "train:\n  max_steps: many\n")
    with pytest.raises(ConfigError, match="unable to parse string as an integer"):
        load_config(path)


@pytest.mark.parametrize("stain", ["", "stain: he, ", "stain: ihc, "])
def test_a_bright_field_profile_of_other_than_three_channels_is_refused(tmp_path, stain):
    """A lab's DAPI profile of channels: 1 that left out `stain` was taken as H&E: its images
    were measured as bright field, the dark background's optical density all "tissue"
    (tissue_fraction 0.97 of a DAPI field) and density_per_mm2_tissue reported from it."""
    path = write(tmp_path / "p.yaml", f"profiles:\n  dapi_20x: {{{stain}channels: 1}}\n")
    with pytest.raises(ConfigError, match=r"p\.yaml \(profile 'dapi_20x'\).*channels: 3"):
        load_profiles(path)
    for ok in ("stain: fluorescence", "stain: none"):
        path = write(tmp_path / "p.yaml", f"profiles:\n  dapi_20x: {{{ok}, channels: 1}}\n")
        assert load_profiles(path)["dapi_20x"].channels == 1


def test_a_fluorescence_tissue_threshold_on_a_bright_field_profile_is_refused(tmp_path):
    """`tissue_intensity_threshold: 0.99` in an H&E profile was ignored without a word: its
    tissue was measured by optical density (0.94 of an H&E tile) as without it."""
    path = write(tmp_path / "p.yaml", "profiles:\n  he_40x: {tissue_intensity_threshold: 0.99}\n")
    with pytest.raises(ConfigError, match=r"he_40x.*tissue_intensity_threshold.*tissue_od_thr"):
        load_profiles(path)
    path = write(
        tmp_path / "p.yaml",
        "profiles:\n  dapi: {stain: fluorescence, tissue_intensity_threshold: 0.2}\n",
    )
    assert load_profiles(path)["dapi"].tissue_intensity_threshold == 0.2


def test_the_packaged_profiles_file_describes_every_profile_key_and_the_defaults():
    """A lab writes its own profile from profiles.yaml's comments: they named neither
    `stain`, `channels` nor `preprocess`, nor what a key left out gets (stain he, size limits
    other than the shipped profiles'), so a DAPI profile without `stain` was H&E."""
    text = default_profiles_path().read_text(encoding="utf-8")
    header = text[: text.index("\nprofiles:")]
    for key in set(Profile.model_fields) - {"name"}:
        assert re.search(rf"\b{key}\b", header), f"profiles.yaml does not describe {key}"
    default = Profile()
    for key in ("min_area_um2", "max_area_um2", "min_area_px", "max_area_px"):
        assert re.search(rf"{key} {getattr(default, key):g}\b", header), key
    assert f"stain {default.stain}, channels {default.channels}" in header


@pytest.mark.parametrize("text", ["train: {grad_clip: .inf}\n", "monitor: {psi_fail: .inf}\n"])
def test_an_infinite_value_is_refused_not_saved_as_null(tmp_path, text):
    """YAML's `.inf` was taken, and the config.json saved beside the weights wrote it as
    null: `grad_clip: .inf` trained, then the model would not load ('bad value for
    train.grad_clip: Input should be a valid number') and the run would not resume."""
    with pytest.raises(ConfigError, match=r"c\.yaml: bad value for '[a-z_.]+': .*finite"):
        load_config(write(tmp_path / "c.yaml", text))
    path = write(tmp_path / "p.yaml", "profiles:\n  lab: {max_area_um2: .inf}\n")
    with pytest.raises(ConfigError, match=r"p\.yaml \(profile 'lab'\).*max_area_um2.*finite"):
        load_profiles(path)


@pytest.mark.parametrize("written", ["None", "none", "'None'"])
def test_encoder_weights_none_written_as_python_is_refused_at_once(tmp_path, written):
    """YAML reads `encoder_weights: None` as the text 'None': the run validated the data,
    then stopped at the model with smp's 'Wrong pretrained weights `None` for encoder
    resnet34. Available options are: imagenet, ssl, swsl', which does not say to write null."""
    path = write(tmp_path / "c.yaml", f"train: {{encoder_weights: {written}}}\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: bad value for 'train\.encoder_weights'.*null"):
        load_config(path)
    assert (
        load_config(
            write(tmp_path / "c.yaml", "train: {encoder_weights: ~}\n")
        ).train.encoder_weights
        is None
    )


def test_a_clahe_tile_grid_no_image_has_is_refused_before_opencv_allocates_it(tmp_path) -> None:
    """A model's config.json from elsewhere with clahe_tile_grid 10000 had segment end in an
    OpenCV traceback, 'Failed to allocate 25600000000 bytes' for a 96 px image (a 256-entry
    table per tile): refused when read, naming the file and the setting."""
    import numpy as np

    from mlseg.preprocess import clahe

    path = tmp_path / "config.json"
    path.write_text('{"preprocess": {"equalize": "clahe", "clahe_tile_grid": 10000}}')
    with pytest.raises(ConfigError, match=r"config\.json: bad value for 'preprocess\.clahe_tile"):
        load_config(path)
    path.write_text('{"preprocess": {"equalize": "clahe", "clahe_tile_grid": 256}}')
    grid = load_config(path).preprocess.clahe_tile_grid
    assert clahe(np.zeros((96, 96, 1), np.uint8), 2.0, grid).shape == (96, 96, 1)
