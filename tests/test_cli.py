import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from mlseg.cli import main
from mlseg.io import write_image


def test_help_lists_stage_commands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("init", "ingest", "synth"):
        assert command in out


def test_init_then_refuse_non_empty(tmp_path, capsys):
    assert main(["init", str(tmp_path / "ds")]) == 0
    assert main(["init", str(tmp_path / "ds")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "not empty" in err and len(err.strip().splitlines()) == 1


def test_ingest_errors_are_one_line_and_name_the_file(tmp_path, capsys):
    src = tmp_path / "src"
    write_image(src / "original" / "a.png", np.zeros((8, 8, 3), np.uint8))
    write_image(src / "masks" / "a_mask.png", np.zeros((8, 8), np.uint8))
    write_image(src / "original" / "b.png", np.zeros((8, 8, 3), np.uint8))
    code = main(["ingest", str(src), str(tmp_path / "ds")])
    err = capsys.readouterr().err
    assert code != 0 and "b.png: image without mask" in err
    assert not (tmp_path / "ds").exists()


def test_a_file_in_the_way_of_an_output_folder_is_one_line(tmp_path, capsys):
    """A file where an output folder must go (or a disk that turned read-only) is named in one
    line, not shown as Python's traceback."""
    (tmp_path / "taken").write_text("")
    assert main(["init", str(tmp_path / "taken" / "ds")]) != 0
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / 'taken'}") and "not a directory" in err
    assert len(err.strip().splitlines()) == 1


def test_a_folder_where_an_output_file_must_go_is_named_with_the_fix(tmp_path, capsys):
    """A folder named summary.csv in the output folder ended `mlseg quantify` in 'error:
    <path>: is a directory', which said nothing of what to do."""
    from mlseg.io import write_labels

    write_image(tmp_path / "images" / "a.png", np.full((16, 16, 3), 200, np.uint8))
    labels = np.zeros((16, 16), np.int32)
    labels[4:9, 4:9] = 1
    write_labels(tmp_path / "masks" / "a_mask.png", labels)
    (tmp_path / "out" / "summary.csv").mkdir(parents=True)
    args = [str(tmp_path / "masks"), str(tmp_path / "images"), str(tmp_path / "out")]
    assert main(["quantify", *args, "--profile", "he"]) != 0
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {tmp_path / 'out' / 'summary.csv'}: ")
    assert "is a directory" in err
    assert err.endswith("a folder of that name is in the way: move it")
    assert len(err.splitlines()) == 1


@pytest.mark.parametrize("command", ["init", "quantify", "validate", "train", "train-unvalidated"])
def test_an_output_folder_linked_to_a_share_not_mounted_names_the_link(
    command, tmp_path, synth_dataset, capsys
):
    """An output folder that is a link to nothing (a network share not mounted) is named with
    its target and the fix; segment and quantify said 'a file is in the way where a folder is needed: move
    it', validate named 'out/outputs', train 'out/validation/outputs', init 'file exists'."""
    from mlseg.io import write_labels

    out = tmp_path / "out"
    out.symlink_to(tmp_path / "share")
    if command == "quantify":  # writes as segment does (outputs.writing_to)
        write_image(tmp_path / "images" / "a.png", np.full((16, 16, 3), 200, np.uint8))
        labels = np.zeros((16, 16), np.int32)
        labels[4:9, 4:9] = 1
        write_labels(tmp_path / "labels" / "a_mask.png", labels)
        argv = ["quantify", str(tmp_path / "labels"), str(tmp_path / "images"), str(out)]
        argv += ["--profile", "he"]
    elif command.startswith("train"):
        config = tmp_path / "run.yaml"
        config.write_text("train: {max_steps: 1}\n")
        argv = ["train", str(config), "--data", str(synth_dataset), "--out", str(out)]
        argv += ["--no-validate"] if command == "train-unvalidated" else []
    elif command == "validate":
        argv = ["validate", str(synth_dataset), "--out", str(out)]
    else:
        argv = ["init", str(out)]
    assert main(argv) != 0
    err = capsys.readouterr().err
    assert err.strip() == (
        f"error: {out}: a link to {tmp_path / 'share'}, which does not exist; create that "
        "folder (or mount its share) or give another folder"
    )
    assert not (tmp_path / "share").exists()


def test_unknown_config_key_exit_code(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data:\n  mask_sufix: _m\n")
    assert main(["init", str(tmp_path / "ds"), "--config", str(cfg)]) == 2
    assert "data.mask_sufix" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["train", "-c", "run.yaml"], "No such option: -c"),
        (["segment", "--bogus"], "No such option: --bogus"),
        (["train"], "Missing argument 'config'"),
        (["nosuch"], "No such command 'nosuch'"),
        (["synth", "--n-train", "many", "ds"], "Invalid value for '--n-train'"),
    ],
)
def test_a_usage_error_is_the_usage_and_the_mistake_not_a_traceback(argv, says, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    # click 8.1 names a missing argument by its metavar ('CONFIG'), later ones by its name
    assert says.lower() in err.lower() and "Try 'mlseg" in err
    assert "Traceback" not in err


def test_no_arguments_shows_the_commands(capsys):
    main([])
    captured = capsys.readouterr()
    assert "segment" in captured.out + captured.err and "Traceback" not in captured.err


def test_console_script_entry_point(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "mlseg.cli",
            "ingest",
            str(tmp_path / "missing"),
            str(tmp_path / "ds"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 2
    assert (
        out.stderr.strip()
        == f"error: {tmp_path / 'missing'}: source folder not found; check the path"
    )


def test_stain_tta_flag_keeps_the_models_own_gains():
    from mlseg.cli.segment import _stain_gains
    from mlseg.config import STAIN_TTA_GAINS, InferenceConfig

    assert _stain_gains(True, (1.0, 1.3)) == (1.0, 1.3)
    assert _stain_gains(True, (1.0,)) == STAIN_TTA_GAINS == InferenceConfig().stain_tta
    assert STAIN_TTA_GAINS != (1.0,)
    assert _stain_gains(False, (1.0, 1.3)) == (1.0,)


def test_a_batch_with_a_failed_image_exits_1_and_keeps_the_others(tmp_path, capsys):
    mask = np.zeros((32, 32), np.uint8)
    mask[8:20, 8:20] = 1
    for stem in ("a", "b"):
        write_image(tmp_path / "images" / f"{stem}.png", np.full((32, 32, 3), 200, np.uint8))
    write_image(tmp_path / "labels" / "a_mask.png", mask)
    (tmp_path / "labels" / "b_mask.png").write_text("not an image")
    out = tmp_path / "out"
    argv = ["quantify", str(tmp_path / "labels"), str(tmp_path / "images"), str(out)]
    assert main([*argv, "--profile", "he", "--no-progress"]) == 1  # a cron job must notice
    captured = capsys.readouterr()
    assert "quantified 1" in captured.out and "b_mask.png" in captured.err
    assert (out / "a_nuclei.csv").is_file() and not (out / "b_nuclei.csv").exists()


def test_no_progress_bar_in_a_log_file_unless_asked(tmp_path, capsys):
    """A job's stderr is a file: the bar, redrawn per image with carriage returns, added a
    line's worth per image (84 bytes; 1.7 MB for 20,000 images) to a SLURM or cron log."""
    mask = np.zeros((32, 32), np.uint8)
    mask[8:20, 8:20] = 1
    write_image(tmp_path / "images" / "a.png", np.full((32, 32, 3), 200, np.uint8))
    write_image(tmp_path / "labels" / "a_mask.png", mask)
    argv = ["quantify", str(tmp_path / "labels"), str(tmp_path / "images"), "-p", "he"]
    assert main([*argv, str(tmp_path / "out")]) == 0
    assert capsys.readouterr().err == ""
    assert main([*argv, str(tmp_path / "again"), "--progress"]) == 0
    assert "quantify: 100%" in capsys.readouterr().err
    synth = ["synth", str(tmp_path / "syn"), "--n-train", "2", "--n-test", "1", "--size", "48"]
    assert main(synth) == 0
    assert main(["ingest", str(tmp_path / "syn"), str(tmp_path / "ing")]) == 0
    assert "\r" not in capsys.readouterr().err


def test_a_job_log_says_how_far_segment_and_quantify_are_now_and_then(
    tmp_path, capsys, monkeypatch, ticking
):
    """In a job's log (cron, nohup, a Prefect worker) segment and quantify drew no bar and
    said nothing for hours: a working run looked like a hung one. A line on stderr now and
    then says how far it is; stdout keeps the results only; a terminal has its bar, and
    --no-progress silences both."""

    ticking(25)  # each image 25 s on the clock the lines read
    mask = np.zeros((32, 32), np.uint8)
    mask[8:20, 8:20] = 1
    for i in range(6):
        write_image(tmp_path / "images" / f"i{i}.png", np.full((32, 32, 3), 200, np.uint8))
        write_image(tmp_path / "labels" / f"i{i}_mask.png", mask)
    (tmp_path / "labels" / "i1_mask.png").write_text("not an image")
    argv = ["quantify", str(tmp_path / "labels"), str(tmp_path / "images"), "-p", "he"]
    assert main([*argv, str(tmp_path / "log")]) == 1
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.startswith("quantify:")]
    assert lines == [
        "quantify: 3/6 images (50%), 1 failed, 1 min elapsed, about 1 min left",
        "quantify: 6/6 images (100%), 1 failed, 3 min elapsed",  # the last: the run's length
    ]
    assert captured.out.splitlines() == [
        f"quantified 5, skipped 0 (already done), failed 1; outputs in {tmp_path / 'log'}"
    ]
    assert main([*argv, str(tmp_path / "quiet"), "--no-progress"]) == 1
    assert "quantify:" not in capsys.readouterr().err
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert main([*argv, str(tmp_path / "terminal")]) == 1
    err = capsys.readouterr().err
    assert "quantify: 100%" in err and "elapsed" not in err  # the bar, not the lines


def _said(err: str, *verbs: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith(verbs)]


def test_a_job_log_says_how_far_validate_is_now_and_then(
    nuclei_dataset, tmp_path, monkeypatch, capsys, ticking
):
    """validate of a study's tens of thousands of files said nothing in a job's log for many
    minutes: a working run looked like a hung one. A line on stderr now and then says how far
    the reading is; stdout is as it was; a terminal has its bar, and --quiet neither."""

    ticking()
    root = nuclei_dataset(n_train=2, n_test=1)  # 6 files, each 25 s on the clock
    assert main(["validate", str(root), "--out", str(tmp_path / "log")]) == 0
    captured = capsys.readouterr()
    assert _said(captured.err, "validate:") == [
        "validate: 3/6 files (50%), 1 min elapsed, about 1 min left",
        "validate: 6/6 files (100%), 3 min elapsed",
    ]
    assert "validate:" not in captured.out
    assert captured.out.endswith(f"{root}: passed; see {tmp_path / 'log' / 'validation.html'}\n")
    assert main(["validate", str(root), "--out", str(tmp_path / "quiet"), "--quiet"]) == 0
    assert _said(capsys.readouterr().err, "validate:") == []
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert main(["validate", str(root), "--out", str(tmp_path / "terminal")]) == 0
    err = capsys.readouterr().err
    assert "reading:" in err and "elapsed" not in err  # the bar, not the lines


def test_a_job_log_says_how_far_ingest_is_now_and_then(
    nuclei_dataset, tmp_path, monkeypatch, capsys, ticking
):
    """ingest of a study, read whole and then copied, said nothing in a job's log for many
    minutes; a line now and then on stderr says how far each pass is, stdout is as it was,
    and a terminal has its bar instead."""

    ticking()
    root = nuclei_dataset(n_train=4, n_test=2)  # 6 pairs, each 25 s on the clock per pass
    assert main(["ingest", str(root), str(tmp_path / "log")]) == 0
    captured = capsys.readouterr()
    assert _said(captured.err, "ingest,") == [
        "ingest, checking: 3/6 pairs (50%), 1 min elapsed, about 1 min left",
        "ingest, checking: 6/6 pairs (100%), 3 min elapsed",
        "ingest, writing: 3/6 pairs (50%), 1 min elapsed, about 1 min left",
        "ingest, writing: 6/6 pairs (100%), 3 min elapsed",
    ]
    assert captured.out.splitlines()[0] == (
        f"ingested 6 pairs (contract layout; test: 2, train: 4) into {tmp_path / 'log'}"
    )
    assert [line.split(":")[0] for line in captured.out.splitlines()[1:]] == ["pixel sizes"]
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert main(["ingest", str(root), str(tmp_path / "terminal")]) == 0
    err = capsys.readouterr().err
    assert "ingesting:" in err and "elapsed" not in err  # the bar, not the lines


def test_a_job_log_says_how_far_tune_is(synth_dataset, tmp_path, monkeypatch, capsys, ticking):
    """tune in a job's log said nothing from its validation to its table, a search of hours
    on a CPU: a working one looked like a hung one. Each trial's epochs and a line a minute
    on how far the search is go to stderr; stdout keeps the table; a terminal has its bar."""
    import mlseg.plots

    monkeypatch.setattr(mlseg.plots, "plot_history", lambda history, path: path)
    ticking(40)  # the search's clock: each trial 40 s
    config = tmp_path / "run.yaml"
    config.write_text(
        "train: {encoder: resnet18, encoder_depth: 3, patch_size: 64, batch_size: 2}\n"
    )
    argv = ["tune", str(config), "--data", str(synth_dataset), "--trials", "2"]
    argv += ["--budget-steps", "1", "--param", "train.lr=1e-3,1e-4", "--no-validate"]
    argv += ["--device", "cpu"]
    assert main([*argv, "--out", str(tmp_path / "log")]) == 0
    captured = capsys.readouterr()
    assert _said(captured.err, "tune:") == [
        "tune: 2/2 trials (100%), 2 min elapsed",  # the last: the search's length
    ]
    epochs = _said(captured.err, "trial_")
    assert [line.split(":")[0] for line in epochs] == ["trial_000", "trial_001"]
    assert all(": epoch 1 step 1: loss=" in line for line in epochs)
    assert "tune:" not in captured.out and "trial_0" not in captured.out
    assert captured.out.splitlines()[-1] == f"best config: {tmp_path / 'log' / 'best_config.yaml'}"
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert main([*argv, "--out", str(tmp_path / "terminal")]) == 0
    err = capsys.readouterr().err
    assert "tune: 100%" in err and "elapsed" not in err and "trial_0" not in err


def test_warnings_are_one_line_each_and_python_is_left_as_it_was(tmp_path):
    import warnings

    for stem in ("a", "b"):
        write_image(tmp_path / "images" / f"{stem}.png", np.full((16, 16, 3), 200, np.uint8))
        write_image(tmp_path / "labels" / f"{stem}_mask.png", np.zeros((16, 16), np.uint8))
    (tmp_path / "sizes.csv").write_text("stem,pixel_size_um\nc,0.5\n")  # names neither image
    argv = ["quantify", str(tmp_path / "labels"), str(tmp_path / "images"), str(tmp_path / "o")]
    argv += ["-p", "he", "--pixel-sizes", str(tmp_path / "sizes.csv"), "--no-progress"]
    run = subprocess.run(
        [sys.executable, "-m", "mlseg.cli", *argv], capture_output=True, text=True, check=False
    )
    assert run.returncode == 0, run.stderr
    assert run.stderr.startswith("warning: the pixel-size table names none of these 2 images")
    assert "UserWarning" not in run.stderr and ".py:" not in run.stderr
    before = warnings.formatwarning
    assert main(["--help"]) == 0
    assert warnings.formatwarning is before


@pytest.mark.parametrize(
    ("command", "what"),
    [("validate", "a dataset"), ("ingest", "a source"), ("segment", "an input")],
)
def test_a_file_given_for_a_folder_is_called_a_file(tmp_path, capsys, command, what):
    config = tmp_path / "run.yaml"
    config.write_text("train: {}\n")
    argv = {
        "validate": [str(config)],
        "ingest": [str(config), str(tmp_path / "ds")],
        "segment": ["model", str(config), str(tmp_path / "out"), "--profile", "he"],
    }[command]
    assert main([command, *argv]) == 2
    err = capsys.readouterr().err
    assert f"run.yaml: a file, not {what} folder" in err


def test_segment_help_states_the_ranges_the_config_accepts(capsys, monkeypatch):
    """The help said '0 to 0.9' for --overlap, and --overlap 0.9 was refused (overlap < 0.9)."""
    from pydantic import ValidationError

    from mlseg.config import InferenceConfig

    monkeypatch.setenv("COLUMNS", "250")
    assert main(["segment", "--help"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "below 0.9" in next(line for line in lines if "--overlap" in line)
    assert "at least 64" in next(line for line in lines if "--tile" in line)
    for bad in ({"overlap": 0.9}, {"tile_size": 32}):
        with pytest.raises(ValidationError):
            InferenceConfig(**bad)
    InferenceConfig(overlap=0.89, tile_size=64)


def test_readme_command_lines_use_commands_and_options_that_exist():
    """Every `mlseg ...` line of the README's shell examples names a command and options
    that `mlseg COMMAND --help` lists."""
    import re
    from pathlib import Path

    import typer.main

    from mlseg.cli import app

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    lines = [
        line.split("#")[0].split()
        for block in re.findall(r"```bash\n(.*?)```", readme, re.S)
        for line in block.splitlines()
        if line.startswith("mlseg ")
    ]
    assert len(lines) >= 10
    root = typer.main.get_command(app)
    for words in lines:
        command, rest = root, words[1:]
        while hasattr(command, "commands"):  # a group: mlseg, mlseg models
            if rest and rest[0].startswith("-"):  # the group's own option: mlseg --version
                break
            assert rest and rest[0] in command.commands, f"README: no command {' '.join(words)}"
            command, rest = command.commands[rest[0]], rest[1:]
        known = {o for p in command.params for o in (*p.opts, *p.secondary_opts)}
        for word in rest:
            if word.startswith("-"):
                assert word in known, f"README: {' '.join(words)}: {word} is no option"


# Options of the outside tools the README's commands call (docker, prefect, pulumi, aws).
OUTSIDE_OPTIONS = {
    *("--all", "--no-prompt", "--pool", "--type", "--limit"),  # prefect
    *("--rm", "--user", "--read-only", "--tmpfs", "--gpus", "--build-arg"),  # docker
    *("--secret", "--path", "--show-urns", "--endpoint-url"),  # pulumi, aws
}


def _options_of_mlseg_and_flows(capsys) -> set[str]:
    """Every option of mlseg's commands, of `python -m flows.*` and of bench/scanner_sweep.py."""
    import re
    from pathlib import Path

    import typer.main

    from flows import demo, pipeline, segment, validate
    from mlseg.cli import app

    known, commands = set(), [typer.main.get_command(app)]
    while commands:
        command = commands.pop()
        known |= {o for p in command.params for o in (*p.opts, *p.secondary_opts)}
        commands += getattr(command, "commands", {}).values()
    for flow_main in (demo.main, pipeline.main, segment.main, validate.main):
        with pytest.raises(SystemExit):
            flow_main(["--help"])
        known |= set(re.findall(r"--[a-z][a-z0-9-]*", capsys.readouterr().out))
    sweep = Path(__file__).resolve().parents[1] / "bench" / "scanner_sweep.py"
    known |= set(re.findall(r"add_argument\(\s*\"(--[a-z][a-z0-9-]*)", sweep.read_text("utf-8")))
    return known


def test_every_option_the_readme_names_exists(capsys):
    """An option named anywhere in the README, in prose too (`--no-progress` of `segment`), is
    one of mlseg's commands, of `python -m flows.*`, of bench/scanner_sweep.py or of an outside
    tool: the code-block test above does not read the prose."""
    import re
    from pathlib import Path

    known = _options_of_mlseg_and_flows(capsys) | OUTSIDE_OPTIONS
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    named = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", readme))
    assert len(named) >= 30
    assert not named - known, f"README names options no command has: {sorted(named - known)}"


# Options of the outside tools mlseg's messages name: docker's --cpus, git's (the registry
# reads the commit), convmv's (a file name that is not UTF-8).
MESSAGE_OUTSIDE_OPTIONS = {
    "--cpus",
    *("--error-unmatch", "--short", "--porcelain", "--untracked-files"),
    "--notest",
}


def test_every_option_mlsegs_messages_name_exists(capsys):
    """An error, warning or help text that tells the user to pass an option ("pass
    --no-resume", "--budget-steps N to resume it") names one that exists: a renamed option
    leaves such advice behind in the library, where the README tests do not look."""
    import ast
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    known = _options_of_mlseg_and_flows(capsys) | MESSAGE_OUTSIDE_OPTIONS
    named: dict[str, str] = {}
    for path in sorted([*root.glob("mlseg/**/*.py"), *root.glob("flows/*.py")]):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                for option in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", node.value):
                    named.setdefault(option, f"{path.relative_to(root)}:{node.lineno}")
    assert len(named) >= 20
    unknown = {o: where for o, where in named.items() if o not in known}
    assert not unknown, f"messages name options no command has: {unknown}"


def test_ingest_help_says_what_the_contract_layout_is(capsys, monkeypatch):
    """--layout offered 'contract' without saying it is an mlseg dataset (the README's name)."""
    monkeypatch.setenv("COLUMNS", "250")
    assert main(["ingest", "--help"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "contract (an mlseg dataset" in next(line for line in lines if "--layout" in line)


def _two_pair_source(src):
    """A flat source to ingest: images ``a`` and ``b``, each with its one-nucleus mask."""
    for stem in ("a", "b"):
        write_image(src / "original" / f"{stem}.png", np.full((8, 8, 3), 200, np.uint8))
        mask = np.zeros((8, 8), np.uint8)
        mask[2:6, 2:6] = 1
        write_image(src / "masks" / f"{stem}_mask.png", mask)
    return src


def test_pixel_size_help_says_which_of_size_and_table_wins(tmp_path, capsys, monkeypatch):
    """`mlseg ingest --help` said --pixel-size was the size "for every image", but ingest
    gives an image listed in --pixel-sizes the table's size (segment and quantify do the
    reverse, which their help did not say either)."""
    import pandas as pd

    monkeypatch.setenv("COLUMNS", "250")
    assert main(["ingest", "--help"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "does not list" in next(line for line in lines if "--pixel-size " in line)
    for command in ("segment", "quantify"):
        assert main([command, "--help"]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert "overrides --pixel-sizes" in next(line for line in lines if "--pixel-size " in line)
    src = _two_pair_source(tmp_path / "src")
    (tmp_path / "sizes.csv").write_text("stem,pixel_size_um\na,0.25\n")
    argv = ["ingest", str(src), str(tmp_path / "ds"), "--pixel-sizes", str(tmp_path / "sizes.csv")]
    assert main([*argv, "--pixel-size", "0.5"]) == 0
    manifest = pd.read_csv(tmp_path / "ds" / "manifest.csv").set_index("stem")
    assert manifest.loc["a", "pixel_size_um"] == 0.25 and manifest.loc["b", "pixel_size_um"] == 0.5


def test_ingest_says_how_many_images_have_a_pixel_size(tmp_path, capsys):
    """CPM15 (20x and 40x tiles) ingested without --pixel-sizes printed only "ingested 15
    pairs": nothing said that no image had a pixel size, so training could not tell the
    scales apart. The summary counts the images with a size, by value and source, and says
    what to do for those without."""
    src = _two_pair_source(tmp_path / "src")
    assert main(["ingest", str(src), str(tmp_path / "none")]) == 0
    out = capsys.readouterr().out
    assert "pixel sizes: none of the 2 images has one" in out
    assert "--pixel-sizes sizes.csv" in out and str(tmp_path / "none" / "manifest.csv") in out
    (tmp_path / "sizes.csv").write_text("stem,pixel_size_um\na,0.25\n")
    argv = ["ingest", str(src), str(tmp_path / "one"), "--pixel-sizes", str(tmp_path / "sizes.csv")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "pixel sizes: 1 of 2 images has one (1 at 0.25 um; from table: 1); 1 has none" in out
    argv = ["ingest", str(src), str(tmp_path / "all"), "--pixel-size", "0.5"]
    assert main(argv) == 0
    line = capsys.readouterr().out.splitlines()[-1]
    assert line == "pixel sizes: 2 of 2 images have one (2 at 0.5 um; from argument: 2)"


@pytest.mark.parametrize("signame, code", [("SIGTERM", 143), ("SIGHUP", 129)])
def test_a_stop_signal_removes_the_file_being_written(tmp_path, monkeypatch, capsys, signame, code):
    """scancel and a SLURM job's time limit send SIGTERM, a closed SSH session or terminal
    SIGHUP: the file being written is removed, as on Ctrl-C, not left as a temporary beside
    the outputs (a checkpoint's in the training folder, which no later run removes); Python's
    default ended mlseg at once, without a word."""
    import os
    import signal
    import time

    import mlseg.dataset
    from mlseg.io import atomic_path

    signum = getattr(signal, signame)

    def init_dataset(directory, cfg):
        with atomic_path(directory / "README.md") as tmp:
            tmp.write_text("half")
            os.kill(os.getpid(), signum)
            time.sleep(5)  # the handler runs at once; a test that waits has failed

    def default(signum, frame):  # Python's own would end pytest too
        raise AssertionError(f"{signame} left to the default handler: the process ends at once")

    monkeypatch.setattr(mlseg.dataset, "init_dataset", init_dataset)
    before = signal.signal(signum, default)
    try:
        assert main(["init", str(tmp_path / "ds")]) == code
        assert signal.getsignal(signum) is default
    finally:
        signal.signal(signum, before)
    assert capsys.readouterr().err == "terminated\n"
    assert list((tmp_path / "ds").iterdir()) == []


@pytest.mark.parametrize("command", ["validate", "quantify", "ingest"])
def test_a_file_name_that_is_not_utf8_is_named_not_a_crash(command, nuclei_dataset, tmp_path):
    """A Latin-1 name (from an old zip or a Windows share) is refused in one line with the fix;
    OpenCV crashed the process on it (segfault), and tables failed with UnicodeEncodeError."""
    root = nuclei_dataset(n_train=2, n_test=1)
    for folder, suffix in (("original", ""), ("masks", "_mask")):
        name = os.fsdecode(f"caf\xe9{suffix}.png".encode("latin-1"))
        shutil.copy(root / "train" / folder / f"train0{suffix}.png", root / "train" / folder / name)
    train = root / "train"
    argv = {
        "validate": ["validate", str(root), "--out", str(tmp_path / "v")],
        "quantify": [
            "quantify",
            str(train / "masks"),
            str(train / "original"),
            str(tmp_path / "q"),
            "-p",
            "he",
        ],
        "ingest": ["ingest", str(root), str(tmp_path / "ing")],
    }[command]
    out = subprocess.run(
        [sys.executable, "-m", "mlseg.cli", *argv], capture_output=True, text=True, check=False
    )
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith(f"error: {train}/") and "caf\\xe9" in out.stderr
    assert "not UTF-8" in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_a_section_that_is_no_mapping_is_refused_with_an_override(tmp_path, capsys):
    """`train: 5` with --device cpu (or --max-steps) trained 1000 steps of the defaults: the
    override took the bad section's place instead of the error naming it."""
    config = tmp_path / "run.yaml"
    config.write_text("train: 5\n")
    code = main(["train", str(config), "--data", str(tmp_path), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and "run.yaml with overrides: bad value for 'train'" in err


def test_train_on_data_failing_validation_points_to_the_page_that_reads_offline(
    nuclei_dataset, tmp_path, capsys
):
    """The error said 'see .../data_docs/index.html': without a network those pages list no
    result (their scripts come from CDNs). It names validation.html first now."""
    data = nuclei_dataset()
    (data / "train/masks/train0_mask.png").unlink()
    config = tmp_path / "run.yaml"
    config.write_text("train: {max_steps: 1}\n")
    out = tmp_path / "run"
    assert main(["train", str(config), "--data", str(data), "--out", str(out), "--quiet"]) == 1
    err = capsys.readouterr().err
    page = out / "validation" / "validation.html"
    assert "image_has_mask" in err and str(page) in err
    assert err.index(str(page)) < err.index("data_docs")
    assert "train/original/train0.png" in page.read_text()


@pytest.mark.parametrize("command", ["train", "tune"])
def test_a_dataset_that_is_a_file_or_missing_is_named_so_without_validation(
    tmp_path, capsys, command
):
    """With --no-validate, a mistyped --data said '<it>/train/original: folder not found;
    a dataset needs train/original/', and a file given there the same."""
    config = tmp_path / "run.yaml"
    config.write_text("train: {}\n")
    for data, said in [
        (config, "run.yaml: a file, not a dataset folder"),
        (tmp_path / "nope", "nope: dataset folder not found"),
    ]:
        argv = [command, str(config), "--data", str(data), "--no-validate", "--device", "cpu"]
        assert main(argv) == 2
        assert said in capsys.readouterr().err


def test_a_folder_given_for_a_file_and_a_file_for_a_new_folder_are_called_so(tmp_path, capsys):
    """A folder given as the config, the profiles or the fingerprint said 'config file not
    found' (or 'profiles file', 'fingerprint'), though it was there; mlseg init on a file
    printed 'not a directory' and exited 1."""
    data, out = tmp_path / "ds", tmp_path / "out"
    assert main(["init", str(data)]) == 0
    capsys.readouterr()
    cases = [
        (["validate", str(data), "--config", str(data)], "ds: a folder, not a config file"),
        (
            ["quantify", str(data), str(data), str(out), "-p", "he", "--profiles", str(data)],
            "ds: a folder, not a profiles file",
        ),
        (["monitor", str(data), "--fingerprint", str(data)], "ds: a folder, not a fingerprint"),
        (["init", str(data / "README.md")], "README.md: a file, not a folder"),
    ]
    for argv, said in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert said in err and len(err.strip().splitlines()) == 1


def test_python_m_mlseg_runs_the_command_and_says_its_version() -> None:
    """A lab whose venv's bin is not on PATH types `python -m mlseg` (it said 'mlseg is a
    package and cannot be directly executed'), and `mlseg --version` (it said 'No such
    option') is how a user tells which mlseg made a result folder."""
    import mlseg

    done = subprocess.run(
        [sys.executable, "-m", "mlseg", "--version"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"mlseg {mlseg.__version__}")


@pytest.mark.parametrize(
    ("module", "distribution"), [("cv2", "opencv-python-headless"), ("skimage", "scikit-image")]
)
def test_a_dependency_that_cannot_be_imported_is_named_with_what_to_install(
    module, distribution, tmp_path
):
    """An install without one of mlseg's dependencies ended mlseg in a ModuleNotFoundError
    traceback; it is one line naming the module and the distribution pip installs."""
    blocked = f"import sys; sys.modules[{module!r}] = None; from mlseg.cli import main; "
    done = subprocess.run(
        [sys.executable, "-c", blocked + f"sys.exit(main(['synth', {str(tmp_path / 'ds')!r}]))"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    err = done.stderr.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    assert f"cannot import {module}," in err and f"pip install {distribution} " in err


def test_a_missing_module_of_mlseg_itself_is_a_bug_shown_whole(monkeypatch):
    """Only a dependency is a package to install: mlseg's own missing module (a bug) and a
    submodule missing from an installed package (a version mismatch) keep their traceback."""
    import mlseg.synth

    for name in ("mlseg.nosuch", "torch.nosuch"):

        def broken(*args, name=name, **kwargs):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

        monkeypatch.setattr(mlseg.synth, "make_dataset", broken)
        with pytest.raises(ModuleNotFoundError):
            main(["synth", "never-written"])


def test_every_dependency_is_named_by_its_distribution():
    """The module-to-distribution table covers every dependency in pyproject.toml."""
    import re
    import tomllib
    from pathlib import Path

    from mlseg.errors import DISTRIBUTIONS

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    wanted = project["dependencies"] + project["optional-dependencies"]["s3"]
    names = {re.match(r"[A-Za-z0-9_.-]+", spec).group().lower() for spec in wanted}
    assert names == set(DISTRIBUTIONS.values())


def test_monitor_since_days_measures_the_images_segmented_in_the_window(tmp_path, capsys):
    """`mlseg monitor inbox/` measured every image the inbox kept: 12 darker slides among 60
    earlier ones warned (exit 0); with --since-days and the segmentation records only the
    week's are measured, and they fail (exit 1)."""
    import json
    from datetime import UTC, datetime, timedelta

    import pandas as pd
    from flow_helpers import disc_images

    from mlseg.inventory import fingerprint
    from mlseg.io import read_image
    from mlseg.monitor import image_stats_table

    stats = image_stats_table(disc_images(tmp_path / "train", 30, seed=1))
    files = stats.assign(role="image", readable=True, split="train", dtype="uint8")
    files = files.assign(content_hash=[f"h{i}" for i in range(len(files))])
    reference = tmp_path / "fingerprint.json"
    reference.write_text(json.dumps(fingerprint(files)))
    inbox = tmp_path / "inbox"
    normal = disc_images(inbox, 60, seed=2)
    dark = [
        write_image(inbox / f"dark_{p.name}", (read_image(p) * 0.4).astype(np.uint8))
        for p in disc_images(tmp_path / "src", 12, seed=3)
    ]
    now = datetime.now(UTC)
    stamps = [now - timedelta(days=30)] * len(normal) + [now - timedelta(days=1)] * len(dark)
    pd.DataFrame(
        {
            "image": [p.stem for p in normal + dark],
            "finished_at": [t.strftime("%Y-%m-%dT%H:%M:%S%z") for t in stamps],
        }
    ).to_csv(tmp_path / "summary.csv", index=False)
    command = ["monitor", str(inbox), "--fingerprint", str(reference)]
    assert main(command) == 0
    assert "WARN: drift in 72 image(s)" in capsys.readouterr().out
    assert main([*command, "--since-days", "7", "--results", str(tmp_path)]) == 1
    assert "drift in 12 image(s): mean_c0 (fail" in capsys.readouterr().err
    assert main([*command, "--since-days", "7"]) == 2
    assert "--results" in capsys.readouterr().err
    # --results alone reads segment's records of every image: no window
    assert main([*command, "--results", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "WARN: drift in 72 image(s)" in out and "segment_scale" in out


def test_a_job_log_says_how_far_monitor_is_now_and_then(tmp_path, monkeypatch, capsys, ticking):
    """monitor of a week's inbox, every image read whole, drew its bar only on a terminal
    and said nothing in a job's log (cron, nohup) until its verdict: a working run looked like
    a hung one. A line on stderr now and then says how far the reading is; stdout is as it
    was; a terminal has its bar instead."""
    import json

    from flow_helpers import disc_images

    from mlseg.inventory import fingerprint
    from mlseg.monitor import image_stats_table

    files = image_stats_table(disc_images(tmp_path / "train", 8, seed=1))
    files = files.assign(role="image", readable=True, split="train", dtype="uint8")
    reference = tmp_path / "fingerprint.json"
    reference.write_text(json.dumps(fingerprint(files)))
    disc_images(tmp_path / "inbox", 6, seed=2)
    ticking()  # each image 25 s on the clock the lines read
    command = ["monitor", str(tmp_path / "inbox"), "--fingerprint", str(reference)]
    assert main(command) == 0
    captured = capsys.readouterr()
    assert _said(captured.err, "monitor:") == [
        "monitor: 3/6 images (50%), 1 min elapsed, about 1 min left",
        "monitor: 6/6 images (100%), 3 min elapsed",
    ]
    assert "monitor:" not in captured.out and "OK: " in captured.out
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert main(command) == 0
    err = capsys.readouterr().err
    assert "reading:" in err and "elapsed" not in err  # the bar, not the lines


def test_ctrl_c_says_aborted_and_exits_130(tmp_path, monkeypatch, capsys):
    """Ctrl-C ended mlseg with 130 and not a word on stderr (typer 0.2x turns it into an
    exit of its own), so a job's log did not say why the run stopped."""
    import mlseg.dataset

    def init_dataset(directory, cfg):
        raise KeyboardInterrupt

    monkeypatch.setattr(mlseg.dataset, "init_dataset", init_dataset)
    assert main(["init", str(tmp_path / "ds")]) == 130
    assert capsys.readouterr().err == "aborted\n"


def test_a_truncated_compressed_table_is_no_ctrl_c(tmp_path, monkeypatch, capsys):
    """A pixel-size table saved as .csv.gz or .csv.bz2 and cut short (a copy interrupted) ended
    mlseg in 'aborted' and exit 130, as after Ctrl-C: typer turns the EOFError that reading it
    raises into its Abort. The table is named with exit 2; an EOFError anywhere else is shown
    whole, as any other unexpected error; an Abort itself is still 'aborted' and 130."""
    import bz2
    import gzip

    import typer

    import mlseg.dataset

    mask = np.zeros((16, 16), np.uint8)
    mask[4:9, 4:9] = 1
    write_image(tmp_path / "images" / "a.png", np.full((16, 16, 3), 200, np.uint8))
    write_image(tmp_path / "labels" / "a_mask.png", mask)
    table = b"stem,pixel_size_um\n" + b"".join(b"a%d,0.5\n" % i for i in range(200))
    damaged = bytearray(gzip.compress(table))
    damaged[30:40] = b"\xff" * 10
    for name, data in [
        ("cut.csv.gz", gzip.compress(table)[:200]),
        ("cut.csv.bz2", bz2.compress(table)[:200]),
        ("damaged.csv.gz", bytes(damaged)),
    ]:
        (tmp_path / name).write_bytes(data)
        argv = ["quantify", str(tmp_path / "labels"), str(tmp_path / "images")]
        argv += [str(tmp_path / "out"), "-p", "he", "--pixel-sizes", str(tmp_path / name)]
        assert main(argv) == 2, name
        err = capsys.readouterr().err
        assert f"error: {tmp_path / name}: cannot read pixel-size table" in err
        assert "aborted" not in err

    def init_dataset(directory, cfg):
        raise EOFError("Compressed file ended before the end-of-stream marker was reached")

    monkeypatch.setattr(mlseg.dataset, "init_dataset", init_dataset)
    with pytest.raises(EOFError):
        main(["init", str(tmp_path / "ds")])
    assert "aborted" not in capsys.readouterr().err

    def declined(directory, cfg):
        raise typer.Abort()

    monkeypatch.setattr(mlseg.dataset, "init_dataset", declined)
    assert main(["init", str(tmp_path / "ds")]) == 130
    assert capsys.readouterr().err == "aborted\n"


def test_sighup_stays_ignored_under_nohup(tmp_path, monkeypatch):
    """`nohup mlseg train ...` ignores SIGHUP so that the run outlives the terminal: mlseg
    must not catch it then."""
    import signal

    import mlseg.dataset

    seen = []

    def init_dataset(directory, cfg):
        seen.append(signal.getsignal(signal.SIGHUP))
        return directory

    monkeypatch.setattr(mlseg.dataset, "init_dataset", init_dataset)
    before = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        assert main(["init", str(tmp_path / "ds")]) == 0
    finally:
        signal.signal(signal.SIGHUP, before)
    assert seen == [signal.SIG_IGN]


def _failed(first_failed: list[str], fix: str):
    """A failed expectation as :func:`mlseg.cli.validate.print_report` reads it."""
    from types import SimpleNamespace

    return SimpleNamespace(
        rule="image_has_mask",
        severity="error",
        success=False,
        n_failed=len(first_failed),
        n_checked=3,
        first_failed=first_failed,
        error=None,
        fix=fix,
        bound="",
    )


def _printed(root: str, outcome) -> str:
    """What print_report shows of one outcome, on a 200-column console without colour."""
    import io
    from types import SimpleNamespace

    from rich.console import Console

    from mlseg.cli.validate import print_report

    buffer = io.StringIO()
    print_report(
        SimpleNamespace(root=root, outcomes=[outcome]),
        Console(file=buffer, width=200, color_system=None),
    )
    return buffer.getvalue()


def test_validate_prints_file_names_and_fixes_with_brackets_as_they_are():
    """Rich read ``[b]`` in a file name as markup: ``slide[b].png`` was printed as
    ``slide.png``, a file the user could not find."""
    names = ["train/original/slide[b].png", "train/original/x[red].png"]
    out = _printed("data[set]", _failed(names, "Add <stem>_mask.png next to [train]/masks."))
    for shown in ("slide[b].png", "x[red].png", "data[set]", "next to [train]/masks"):
        assert shown in out


def test_validate_prints_file_names_with_emoji_codes_as_they_are():
    """Rich read ``:b:`` in a file name as an emoji code: ``well:b:03.png`` was printed as
    ``well🅱03.png``, a file the user could not find or grep for."""
    outcome = _failed(["train/original/well:b:03.png"], "Add train/masks/well:b:03_mask.png.")
    out = _printed("run:100:", outcome)
    for shown in ("original/well:b:03.png", "masks/well:b:03_mask.png", "run:100:"):
        assert shown in out


def test_validate_in_a_log_file_keeps_each_file_name_on_one_line(capsys):
    """Printed to a file (a CI or nohup log), Rich's 80 columns split a long file name
    across two lines of the table, so a grep for it found nothing."""
    from types import SimpleNamespace

    from mlseg.cli.validate import print_report

    names = [f"train/original/patient_000{i}_slide_03_region_12.png" for i in (1, 2)]
    outcome = _failed(
        names,
        "An image has no mask in the split's mask folder. Add <stem>_mask.png, fix the "
        "mask's name, or remove the image.",
    )
    print_report(SimpleNamespace(root="data", outcomes=[outcome]))
    lines = capsys.readouterr().out.splitlines()
    for name in names:
        assert any(name in line for line in lines)
    assert any(line == f"image_has_mask: {outcome.fix}" for line in lines)


def test_quantify_and_segment_say_when_measurements_are_in_pixels(tmp_path, recwarn, nuclei_pair):
    """Run as the README writes it, `mlseg segment MODEL new-images/ results/ -p he` on images
    without a pixel size measured in pixels (area_px, no nuclei per mm2) and said nothing:
    a user expecting microns had to find --pixel-sizes alone. One warning names the images
    and the options; a size given, or --units px, leaves it out."""
    rng = np.random.default_rng(0)
    for stem in ("a", "b"):
        image, labels = nuclei_pair(rng, 48)
        write_image(tmp_path / "images" / f"{stem}.png", image)
        write_image(tmp_path / "labels" / f"{stem}_mask.png", labels)
    argv = ["quantify", str(tmp_path / "labels"), str(tmp_path / "images"), "-p", "he"]

    def said() -> list[str]:
        found = [str(w.message) for w in recwarn if "no pixel size" in str(w.message)]
        recwarn.clear()
        return found

    assert main([*argv, str(tmp_path / "px")]) == 0
    assert said() == [
        "2 of 2 image(s) have no pixel size (a, b): measured in pixels (area_px, no nuclei "
        "per mm2); give --pixel-sizes sizes.csv (stem,pixel_size_um) or --pixel-size to "
        "measure in microns, or --units px to say pixels are meant"
    ]
    assert main([*argv, str(tmp_path / "um"), "--pixel-size", "0.5"]) == 0
    assert main([*argv, str(tmp_path / "asked"), "--units", "px"]) == 0
    assert said() == []


def test_the_pixels_warning_names_only_images_without_a_size_and_heeds_the_profile(
    tmp_path, recwarn, nuclei_pair
):
    """A profile that sets ``units: px`` measures in pixels whatever the size: with
    --pixel-size 0.5 given, quantify warned that both images 'have no pixel size' and to give
    --pixel-size, which was given, and that --units px would say pixels are meant, which the
    profile had said. It is silent there, as with --units px."""
    import yaml

    from mlseg.config import default_profiles_path

    rng = np.random.default_rng(0)
    for stem in ("a", "b"):
        image, labels = nuclei_pair(rng, 48)
        write_image(tmp_path / "images" / f"{stem}.png", image)
        write_image(tmp_path / "labels" / f"{stem}_mask.png", labels)
    profiles = yaml.safe_load(default_profiles_path().read_text(encoding="utf-8"))
    profiles["profiles"]["he"]["units"] = "px"
    (tmp_path / "profiles.yaml").write_text(yaml.safe_dump(profiles), encoding="utf-8")
    argv = ["quantify", str(tmp_path / "labels"), str(tmp_path / "images"), "-p", "he"]
    argv += ["--profiles", str(tmp_path / "profiles.yaml")]
    assert main([*argv, str(tmp_path / "sized"), "--pixel-size", "0.5"]) == 0
    assert main([*argv, str(tmp_path / "unsized")]) == 0
    assert [str(w.message) for w in recwarn if "no pixel size" in str(w.message)] == []
