"""The command line: help, version, errors as one line, the analysis levels' placeholders."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from fcflow import __version__
from fcflow.cli import main


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fcflow", *args], capture_output=True, text=True, timeout=120)


def test_version_and_help():
    done = _run("--version")
    assert done.returncode == 0 and done.stdout.strip() == f"fcflow {__version__}"
    done = _run("--help")
    assert done.returncode == 0
    for word in ("participant", "group", "simulate", "seeds", "demo"):
        assert word in done.stdout


def test_no_arguments_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "BIDS_DIR OUTPUT_DIR" in capsys.readouterr().out


def test_tool_help_uses_module_docstring():
    done = _run("demo", "--help")
    assert done.returncode == 0
    assert "sample study" in done.stdout


def test_analysis_needs_a_bids_dataset(tmp_path, capsys):
    status = main([str(tmp_path / "nothing"), str(tmp_path / "out"), "participant"])
    err = capsys.readouterr().err
    assert status == 1
    assert err.startswith("fcflow: error: BIDS_DIR ")
    assert "dataset_description.json" in err
    assert "Traceback" not in err


def test_bad_recipe_is_one_line_without_traceback(tmp_path):
    (tmp_path / "dataset_description.json").write_text("{}")
    bad = tmp_path / "bad.toml"
    bad.write_text("[study]\nname = 'x'\nfoo = 1\n")
    done = _run(str(tmp_path), str(tmp_path / "out"), "group", "--recipe", str(bad))
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1
    assert "bad.toml: [study] has an unknown key 'foo'" in done.stderr


def test_debug_shows_the_traceback(tmp_path):
    (tmp_path / "dataset_description.json").write_text("{}")
    bad = tmp_path / "bad.toml"
    bad.write_text("not toml [")
    done = _run(str(tmp_path), str(tmp_path / "out"), "group", "--recipe", str(bad), "--debug")
    assert done.returncode != 0
    assert "Traceback" in done.stderr and "RecipeError" in done.stderr


@pytest.mark.parametrize("label", ["../x", "sub-0/1", "a b"])
def test_participant_labels_with_path_characters_are_refused(tmp_path, label, capsys):
    with pytest.raises(SystemExit) as info:
        main([str(tmp_path), str(tmp_path / "out"), "participant", "--participant-label", label])
    assert info.value.code == 2
    assert "participant labels must be letters and digits" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["0", "-2", "two"])
def test_demo_refuses_an_nprocs_that_is_not_a_positive_integer(tmp_path, value, capsys):
    with pytest.raises(SystemExit) as info:
        main(["demo", str(tmp_path / "demo"), "--nprocs", value])
    assert info.value.code == 2
    assert f"'--nprocs' must be a positive int. Got '{value}'." in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()


def test_demo_uses_the_stand_in_seed_when_the_atlas_is_unavailable(tmp_path):
    import nibabel as nib
    import numpy as np

    from fcflow.cli.demo import _stand_in_recipe
    from fcflow.config import load_recipe

    truth = tmp_path / "bids" / "derivatives" / "ground_truth"
    truth.mkdir(parents=True)
    mask = truth / "space-MNI152NLin2009cAsym_res-4_desc-pgACC_mask.nii.gz"
    nib.Nifti1Image(np.ones((3, 4, 5), dtype=np.uint8), np.eye(4)).to_filename(mask)
    recipe = load_recipe(_stand_in_recipe(tmp_path, tmp_path / "bids"))
    (seed,) = recipe.seeds
    assert seed.name == "pgACC" and seed.mask == str(mask) and seed.areas == ()
    shipped = load_recipe("weigner2025_pgacc")
    assert recipe.replace(seeds=shipped.seeds).fingerprint() == shipped.fingerprint()



def _every_parser() -> dict[str, argparse.ArgumentParser]:
    """Every parser ``main`` builds (the top one, each tool's, the analysis'), subparsers included."""
    from fcflow.cli import _TOOLS, build_parser

    todo = [("fcflow", build_parser([])),
            ("fcflow BIDS_DIR OUTPUT_DIR participant", build_parser(["BIDS_DIR", "OUTPUT_DIR", "participant"]))]
    todo += [(f"fcflow {tool}", build_parser([tool])) for tool in _TOOLS]
    found = {}
    while todo:
        name, parser = todo.pop()
        found[name] = parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                todo.extend((f"{name} {sub}", subparser) for sub, subparser in action.choices.items())
    return found


def _arguments_without_help(parser: argparse.ArgumentParser) -> list[str]:
    return [
        "/".join(action.option_strings) or action.dest
        for action in parser._actions
        if not isinstance(action, argparse._HelpAction)
        and (not action.help or action.help == argparse.SUPPRESS or not action.help.strip())
    ]


def test_the_help_check_finds_an_argument_without_help():
    parser = argparse.ArgumentParser()
    parser.add_argument("--documented", help="has help")
    parser.add_argument("--bare")
    parser.add_argument("--blank", help=" ")
    parser.add_argument("position")
    assert _arguments_without_help(parser) == ["--bare", "--blank", "position"]


def test_every_cli_argument_has_help():
    parsers = _every_parser()
    assert set(parsers) >= {"fcflow", "fcflow BIDS_DIR OUTPUT_DIR participant", "fcflow simulate",
                            "fcflow seeds", "fcflow demo"}
    missing = {name: _arguments_without_help(parser) for name, parser in parsers.items()}
    assert not {name: arguments for name, arguments in missing.items() if arguments}
    for parser in parsers.values():
        parser.format_help()  # raises on a help string with a lone '%' (argparse formats it)
