"""The one declaration of the options: every option is reachable from the command line and
from a job file, with the same meaning and the same error for a bad value."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from click.testing import CliRunner

from gradpipe.cli import cli
from gradpipe.config import TrainConfig
from gradpipe.options import options

DECLARED = {n: o for n, o in options(TrainConfig).items() if o.as_flag}


def good_value(name: str, option) -> tuple[str, object, str]:
    """(flag text, TOML text, expected field value) of a valid value unlike the default."""
    if option.kind == "bool":
        default = [f for f in dataclasses.fields(TrainConfig) if f.name == name][0].default
        return "", "false" if default else "true", not default
    if option.choices:
        choice = option.choices[-1]
        return choice, f'"{choice}"', choice
    if option.kind == "int":
        return "7", "7", 7
    if option.kind == "float":
        return "0.5", "0.5", 0.5
    if option.kind == "batch":
        return "5", "5", 5
    if option.kind == "sizes":
        return "4,3", "[4, 3]", (4, 3)
    if option.kind == "names":
        return "a,b", '["a", "b"]', ("a", "b")
    if option.kind == "url":
        return "http://127.0.0.1:9", '"http://127.0.0.1:9"', "http://127.0.0.1:9"
    return "some/where", '"some/where"', "some/where"


def bad_value(option) -> tuple[str, str] | None:
    """(flag text, TOML text) of a value the declaration refuses."""
    if option.choices:
        return "nope", '"nope"'
    if option.kind in ("int", "batch"):
        return ("0", "0") if option.low is not None and option.low >= 1 else ("-3", "-3")
    if option.kind == "float":
        return ("-1", "-1") if option.low is not None else ("abc", '"abc"')
    if option.kind == "sizes":
        return "0,2", "[0, 2]"
    if option.kind == "url":
        return "some/where", '"some/where"'
    return None


def companions(name: str) -> list[str]:
    """The flags an option needs beside it: --per-sample for --per-sample-every, and those
    of a valid private run for --dp-* (test_privacy tests the refusals)."""
    if name == "per_sample_every":
        return ["--per-sample", "norms"]
    if not name.startswith("dp_"):
        return []
    private = {"dp_clip": "1", "dp_noise": "1", "dp_delta": "1e-5", "batch_rate": "0.1"}
    if name == "dp_epsilon":
        private.pop("dp_noise")
    private.pop(name, None)
    return [x for k, v in private.items() for x in ("--" + k.replace("_", "-"), v)] + [
        "--no-standardize"]


@pytest.fixture
def captured(monkeypatch):
    """Run the CLI without training: the TrainConfig it builds is captured instead."""
    seen: list[TrainConfig] = []

    def fake_train(config, progress=None, note=None):
        seen.append(config)
        return {"step": 0, "loss": 0.0, "grad_norm": 0.0}

    monkeypatch.setattr("gradpipe.train.train", fake_train)
    return seen


def command_for(name: str) -> str:
    return "train" if "train" in DECLARED[name].commands else "grad"


@pytest.mark.parametrize("name", sorted(DECLARED))
def test_every_option_means_the_same_as_a_flag_and_in_a_job_file(name, captured, tmp_path):
    option = DECLARED[name]
    flag_text, toml_text, expected = good_value(name, option)
    flag = "--" + name.replace("_", "-")
    command = command_for(name)
    base = (["--out", str(tmp_path / "run")] if name != "out" else []) + companions(name)
    if option.kind == "bool":  # a flag that is on by default is turned off with --no-...
        args = [flag if expected else "--no-" + name.replace("_", "-")]
    else:
        args = [flag, flag_text]
    if name == "resume":  # resume needs a run; its meaning is tested in test_train
        pytest.skip("--resume reads the run's options: tested with a real run")
    r1 = CliRunner().invoke(cli, [command, "data", *base, *args, "--quiet"])
    assert r1.exit_code == 0, r1.output
    job = tmp_path / "job.toml"
    job.write_text(f'data = "data"\n{name} = {toml_text}\n')
    r2 = CliRunner().invoke(cli, [command, "--job", str(job), *base, "--quiet"])
    assert r2.exit_code == 0, r2.output
    from_flag, from_job = captured
    assert getattr(from_flag, name) == getattr(from_job, name) == expected
    assert from_flag == from_job


@pytest.mark.parametrize("name", sorted(n for n in DECLARED if bad_value(DECLARED[n])))
def test_a_bad_value_gets_the_same_error_from_a_flag_and_from_a_job_file(name, captured,
                                                                        tmp_path: Path):
    flag_text, toml_text = bad_value(DECLARED[name])
    flag = "--" + name.replace("_", "-")
    command = command_for(name)
    r1 = CliRunner().invoke(cli, [command, "data", "--out", str(tmp_path / "r"), flag,
                                  flag_text])
    job = tmp_path / "job.toml"
    job.write_text(f'data = "data"\nout = "{tmp_path / "r"}"\n{name} = {toml_text}\n')
    r2 = CliRunner().invoke(cli, [command, "--job", str(job)])
    assert r1.exit_code == r2.exit_code == 2
    assert not captured
    line1, line2 = r1.stderr.strip(), r2.stderr.strip()
    assert line1.startswith(f"gradpipe: error: {flag} ") and "\n" not in line1
    assert line2 == line1.replace("gradpipe: error: ", f"gradpipe: error: {job}: ")


def test_flags_beat_the_job_file(captured, tmp_path):
    job = tmp_path / "job.toml"
    job.write_text('data = "data"\nlr = 0.5\nsteps = 9\nhidden = [3]\n')
    r = CliRunner().invoke(cli, ["train", "--job", str(job), "--lr", "0.25", "--out",
                                 str(tmp_path / "r"), "--quiet"])
    assert r.exit_code == 0, r.output
    assert (captured[0].lr, captured[0].steps, captured[0].hidden) == (0.25, 9, (3,))


def test_an_unknown_job_key_lists_the_known_ones(tmp_path):
    job = tmp_path / "job.toml"
    job.write_text('data = "data"\nlearning_rate = 0.5\n')
    r = CliRunner().invoke(cli, ["train", "--job", str(job)])
    assert r.exit_code == 2
    assert "unknown key 'learning_rate'" in r.stderr and "lr" in r.stderr


def test_help_shows_every_declared_option_with_its_default():
    text = CliRunner().invoke(cli, ["train", "--help"], terminal_width=200).output
    for name, option in DECLARED.items():
        if "train" in option.commands:
            assert "--" + name.replace("_", "-") in text
    assert "Default: 300." in text  # --steps


# The commands whose configs are not TrainConfig, and the TrainConfig options they take.
SHARED = {
    "evaluate": ("workers", "address", "block_rows", "memory_budget"),
    "predict": ("workers", "address", "block_rows", "memory_budget"),
    "scores": ("workers", "address"),
    "influence": ("workers", "address", "memory_budget"),
}
REQUIRED = {"evaluate": ["RUN", "DATA"], "predict": ["RUN", "DATA", "--out", "o"],
            "scores": ["RUN"], "influence": ["RUN", "--test", "T", "--out", "o.parquet"]}


@pytest.mark.parametrize("command", sorted(SHARED))
def test_other_commands_take_train_options_as_declared(command):
    """evaluate, predict, scores and influence show TrainConfig's help for the options they
    share with it, and refuse a bad value with TrainConfig's message, before any work."""
    runner = CliRunner()
    help_text = " ".join(runner.invoke(cli, [command, "--help"], terminal_width=400)
                         .output.split())
    for name in SHARED[command]:
        option = DECLARED[name]
        assert " ".join(option.help.split()) in help_text, (command, name)
        bad = bad_value(option)
        if bad is None:
            continue
        train = runner.invoke(cli, ["train", "data", "--" + name.replace("_", "-"), bad[0]])
        other = runner.invoke(cli, [command, *REQUIRED[command],
                                    "--" + name.replace("_", "-"), bad[0]])
        assert other.exit_code == train.exit_code == 2, other.output
        assert other.stderr == train.stderr and other.stderr.count("\n") == 1
