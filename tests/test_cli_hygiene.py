"""The command line answers at once and in words: --help and `methods` without importing torch,
every subcommand's --help shows its options, method names are exact with suggestions, and
mergekit's other tools are refused by name."""

import subprocess
import sys

import pytest

from mergekit_lite.cli import build_parser, main
from mergekit_lite.dropin import main_multi, main_yaml, multi_parser, yaml_parser

from conftest import REPO, write_plan

NO_TORCH = """
import sys
from mergekit_lite.cli import build_parser, main
from mergekit_lite.dropin import multi_parser, yaml_parser
build_parser(), yaml_parser(), multi_parser()
for argv in (["--help"], ["run", "--help"], ["methods"], ["methods", "ramplus_tl"], ["methods", "TIES"]):
    try:
        main(argv)
    except SystemExit:
        pass
print("torch imported:", "torch" in sys.modules)
"""


def test_help_and_methods_do_not_import_torch():
    r = subprocess.run([sys.executable, "-c", NO_TORCH], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "torch imported: False" in r.stdout
    assert "ramplus_tl: 1+ model(s), needs base_model" in r.stdout


@pytest.mark.parametrize("command", ["run", "plan", "methods", "examples", "bench"])
def test_every_subcommand_help_shows_its_options(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    sub = build_parser()._subparsers._group_actions[0].choices[command]
    for action in sub._actions:
        for flag in action.option_strings:
            assert flag in out, (command, flag)


@pytest.mark.parametrize("entry,parser,needed", [
    (main_yaml, yaml_parser, ["CONFIG_FILE", "OUT_PATH", "--out-shard-size", "--cuda", "--copy-tokenizer",
                              "--random-seed", "--lazy-unpickle", "--allow-crimes", "--num-threads", "--quiet"]),
    (main_multi, multi_parser, ["CONFIG_FILE", "--out-path", "--intermediate-dir", "-I", "--lazy", "--no-lazy",
                                "--out-shard-size"]),
])
def test_entry_point_help(entry, parser, needed, capsys):
    with pytest.raises(SystemExit) as exc:
        entry(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert all(n in out for n in needed)
    assert "10^9 parameters" in out  # --out-shard-size says its unit


def test_entry_points_are_installed_with_the_package():
    from importlib.metadata import entry_points

    scripts = {e.name: e.value for e in entry_points(group="console_scripts")}
    assert scripts.get("mergekit-yaml") == "mergekit_lite.dropin:main_yaml"
    assert scripts.get("mergekit-multi") == "mergekit_lite.dropin:main_multi"


@pytest.mark.parametrize("name,guess", [("TIES", "ties"), ("Ram", "ram"), ("arcee-fusion", "arcee_fusion"),
                                        ("task_arithmetc", "task_arithmetic")])
def test_methods_name_is_exact_and_suggests(name, guess, capsys):
    assert main(["methods", name]) == 2
    err = capsys.readouterr().err
    assert f"unknown merge method '{name}' (did you mean '{guess}'?)" in err
    assert "known methods: " in err and "ramplus_tl" in err and "Traceback" not in err


def test_methods_unknown_without_a_close_name(capsys):
    assert main(["methods", "zzz"]) == 2
    err = capsys.readouterr().err
    assert "unknown merge method 'zzz'; known methods: arcee_fusion, breadcrumbs" in err


def test_methods_lists_the_new_methods_with_their_defaults(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "arcee_fusion: 1 model(s), needs base_model" in out
    assert "epsilon (global, float, default 1e-05)" in out
    assert "r (global, float, default 0.1)" in out and "alpha (global, float, default 0.2)" in out


@pytest.mark.parametrize("argv,feature", [
    (["evolve", "evol.yml", "--storage-path", "x"], "mergekit-evolve"),
    (["mergekit-evolve", "evol.yml"], "mergekit-evolve"),
    (["tokensurgeon", "model", "donor", "out"], "mergekit-tokensurgeon"),
    (["mergekit-tokensurgeon", "model", "donor", "out"], "mergekit-tokensurgeon"),
])
def test_mergekit_tools_we_lack_are_refused_by_name(argv, feature, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert feature in err and "not supported" in err


EVOLVE = """\
genome:
  models:
    - org/a
    - org/b
  merge_method: dare_ties
  base_model: org/a
  layer_granularity: 8
tasks:
  - name: eq_bench
    weight: 1.0
"""


def test_an_evolve_config_is_refused_as_such(tmp_path, capsys):
    plan = write_plan(tmp_path, EVOLVE)
    assert main(["run", plan, str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"{plan}:1: genome: this is a mergekit-evolve configuration" in err
    assert "unknown key" not in err and "merge_method" in err  # one message, not one per key
    assert main_yaml([plan, str(tmp_path / "o")]) == 2
    assert "mergekit-evolve configuration" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
