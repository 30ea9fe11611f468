"""The command line explains itself and agrees with the workflow: help on every command and option, defaults from the
default run's configuration, user commands apart from the workflow's steps, --version, `methods --settings NAME`."""
import dataclasses
import json
import re
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest
import yaml

from continual_bench import cli
from continual_bench.config_defaults import default_config

REPO = Path(__file__).resolve().parent.parent
RULES = sorted((REPO / "workflow" / "rules").glob("*.smk"))


def _subparsers(parser):
    (action,) = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
    return action.choices


def _validated_default_config() -> dict:
    """config/config.yaml with the schema's defaults filled in by Snakemake itself (what a default run gets)."""
    from snakemake.utils import validate

    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    validate(cfg, str(REPO / "workflow" / "schemas" / "config.schema.yaml"))
    return cfg


def _lookup(cfg: dict, key: str):
    for part in key.split("."):
        cfg = cfg[part]
    return cfg


def test_every_command_and_option_has_help_with_its_default():
    parser = cli.build_parser()
    assert all(a.help for a in parser._actions), "top-level options without help"
    top = " ".join(parser.format_help().split())
    for name, sub in _subparsers(parser).items():
        assert cli.COMMANDS[name].help and f" {name} {cli.COMMANDS[name].help}" in top, name
        text = " ".join(sub.format_help().split())
        for action in sub._actions:
            assert action.help and action.help.strip(), f"{name} {action.option_strings or action.dest}: no help"
            shown = action.default not in (None, False, [], "==SUPPRESS==") and not action.required
            if shown and action.option_strings:
                assert f"(default: {action.default}" in text, f"{name} {action.option_strings}: default not shown"


def test_cli_defaults_equal_the_default_run_config():
    """Every option bound to a config key defaults to the default run's value (resolved here by Snakemake's own
    validate), including the ones the issue found wrong (pretrain-vae --steps, generate's sampling settings)."""
    cfg = _validated_default_config()
    assert default_config() == cfg
    subs = _subparsers(cli.build_parser())
    bound = {}
    for c in cli.COMMANDS.values():
        for o in c.options:
            if o.config:
                dest = next(a.dest for a in subs[c.name]._actions if o.flags[0] in a.option_strings)
                default = subs[c.name].get_default(dest)
                assert default == _lookup(cfg, o.config), (c.name, o.flags, o.config)
                bound[c.name, dest] = o.config
    # the options a rule fills from the config: each one is bound to the key the rule reads
    assert {("pretrain-vae", "steps"): "toy.vae_steps", ("pretrain-text-encoder", "steps"): "toy.text_encoder_steps",
            ("pretrain-t2i", "steps"): "toy.t2i_steps", ("pretrain-t2i", "batch_size"): "toy.t2i_batch_size",
            ("train-judge", "steps"): "toy.judge_steps", ("train-oracle", "epochs"): "toy.oracle_epochs",
            ("pretrain-vae", "latent_size"): "toy.latent_size", ("make-toy-data", "n_concepts"): "toy.n_concepts",
            ("make-toy-data", "n_generic_ids"): "toy.n_generic_ids", ("make-toy-imagenet-r", "n_classes"):
            "toy_cls.n_classes", ("pretrain-vit", "steps"): "toy_cls.vit_steps", ("pretrain-vit", "lr"): "toy_cls.vit_lr",
            ("generate", "n_samples"): "evaluation.n_samples", ("generate", "sample_steps"): "evaluation.sample_steps",
            ("generate", "guidance"): "evaluation.guidance", ("generate", "full_matrix"): "evaluation.full_matrix",
            ("noise-floor", "max_concepts"): "noise_floor.concepts", ("noise-floor", "repeats"): "noise_floor.repeats",
            ("train", "device"): "device", ("train-cls", "device"): "device",
            ("fetch", "offline"): "paper.offline", ("prepare-celeba-hq", "data_seed"): "paper.data_seed",
            }.items() <= bound.items()


def test_noise_floor_fills_missing_eval_settings_from_the_config(monkeypatch):
    from continual_bench.evaluation import judge, noise_floor

    seen = {}
    monkeypatch.setattr(judge, "load_judge", lambda path: None)
    monkeypatch.setattr(noise_floor, "write_noise_floor", lambda **kw: seen.update(kw))
    rc = cli.main(["noise-floor", "--data", "d", "--judge", "j", "--benchmark", "toy_faces", "--out", "o.csv",
                   "--eval-settings", json.dumps({"n_samples": 7})])
    ev = _validated_default_config()["evaluation"]
    assert rc == 0 and (seen["n_samples"], seen["steps"], seen["guidance"]) == (7, ev["sample_steps"], ev["guidance"])
    assert seen["max_concepts"] == _validated_default_config()["noise_floor"]["concepts"]


def test_help_groups_user_commands_apart_from_the_workflow_steps():
    out = subprocess.run([sys.executable, "-m", "continual_bench", "--help"], capture_output=True, text=True,
                         check=True).stdout
    user, steps = out.split(f"\n{cli.STEPS}:\n")
    listed = lambda text: re.findall(r"^ {2,4}([a-z0-9-]+)  ", text, re.M)  # noqa: E731
    assert {"methods", "tables", "compare"} <= set(listed(user.split(f"{cli.USER}:\n")[1]))
    assert {"train", "generate", "evaluate", "fetch", "pretrain-vae"} <= set(listed(steps))
    assert sorted(listed(user.split(f"{cli.USER}:\n")[1]) + listed(steps)) == sorted(cli.COMMANDS)  # each once


def test_version():
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    res = subprocess.run([sys.executable, "-m", "continual_bench", "--version"], capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.strip() == f"continual-bench {version}"
    script = Path(sysconfig.get_path("scripts")) / "continual-bench"  # the console script the rules run
    if script.is_file():
        res = subprocess.run([str(script), "--version"], capture_output=True, text=True)
        assert res.returncode == 0 and res.stdout.strip() == f"continual-bench {version}"


def test_methods_settings_prints_type_default_range_and_help(capsys):
    from continual_bench.methods.base import setting_meta
    from continual_bench.methods.registry import get_method

    assert cli.main(["methods", "--settings", "lora_sequential"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("t2i lora_sequential: Smith et al.")
    assert lines[1].split() == ["name", "type", "default", "range", "help"]
    rows = {ln.split()[0]: ln for ln in lines[2:]}
    S = get_method("t2i", "lora_sequential").Settings
    assert set(rows) == {f.name for f in dataclasses.fields(S)}
    assert rows["rank"].split()[:5] == ["rank", "int", "4", "rank", ">="] and "LoRA rank" in rows["rank"]
    assert rows["alpha"].split()[:5] == ["alpha", "float", "4.0", "alpha", ">"]
    assert rows["flip"].split()[:5] == ["flip", "bool", "True", "true", "or"]
    for f in dataclasses.fields(S):  # every field's help, as declared with setting()
        assert rows[f.name].rstrip().endswith(setting_meta(S, f.name)["help"]), f.name

    assert cli.main(["methods", "--settings", "lora_sequential", "--json"]) == 0
    (entry,) = json.loads(capsys.readouterr().out)
    assert entry["track"] == "t2i" and {r["name"]: r["default"] for r in entry["settings"]} == {
        f.name: f.default for f in dataclasses.fields(S)}
    assert next(r for r in entry["settings"] if r["name"] == "lr") == {
        "name": "lr", "type": "float", "default": 5e-3, "range": "lr > 0",
        "help": "learning rate of the LoRA weights (paper profile: 5e-4)"}


def test_methods_settings_of_a_name_in_both_tracks_and_of_an_unknown_name(capsys):
    assert cli.main(["methods", "--settings", "c_lora"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("t2i c_lora: ") and "\ncls c_lora: " in out
    assert cli.main(["methods", "--settings", "c_lora", "--track", "cls"]) == 0
    assert capsys.readouterr().out.startswith("cls c_lora: ")
    res = subprocess.run([sys.executable, "-m", "continual_bench", "methods", "--settings", "nope"],
                         capture_output=True, text=True)
    (err,) = res.stderr.splitlines()
    assert res.returncode == 2 and err.startswith("continual-bench: error: methods --settings: unknown method 'nope'")
    assert "t2i: " in err and "lora_sequential" in err and "cls: " in err and "coda_p" in err


def _rules() -> dict[str, str]:
    """Rule name -> its text, from every rule file."""
    out = {}
    for path in RULES:
        parts = re.split(r"^rule (\w+):\n", path.read_text(), flags=re.M)
        out.update(dict(zip(parts[1::2], parts[2::2])))
    return out


def test_rules_run_the_console_script_with_registered_commands_and_options():
    """Every rule calls the command line explicitly ({CLI:q}, defined in common.smk), never a shell function; each
    command it names is registered, each option it passes exists, and the GPU rules are the GPU commands."""
    common = (REPO / "workflow" / "rules" / "common.smk").read_text()
    assert "continual-bench()" not in common and re.search(r"^CLI = ", common, re.M)
    parser_of = _subparsers(cli.build_parser())
    called, gpu_rules = set(), set()
    for rule, text in _rules().items():
        m = re.search(r'"\{CLI:q\} (?:--threads \{threads\} )?([a-z0-9-]+)(.*?)(?:2>|$)', text, re.S)
        if not m:
            assert "continual-bench" not in text, rule
            continue
        name = m.group(1)
        assert name in cli.COMMANDS, f"rule {rule}: unknown command {name}"
        known = {s for a in parser_of[name]._actions for s in a.option_strings}
        passed = set(re.findall(r"(?<![\w-])(--[a-z][A-Za-z0-9-]*)", m.group(2)))
        assert passed <= known, f"rule {rule}: {sorted(passed - known)} are not options of {name}"
        called.add(name)
        if re.search(r"^\s+gpu=1,", text, re.M):
            gpu_rules.add(name)
    assert gpu_rules == {c.name for c in cli.COMMANDS.values() if c.gpu}
    assert called == {c.name for c in cli.COMMANDS.values() if c.group != "user"} | {"tables", "bench"}


def test_registering_a_command_twice_or_in_an_unknown_group_is_refused(monkeypatch):
    monkeypatch.setattr(cli, "COMMANDS", dict(cli.COMMANDS))
    with pytest.raises(ValueError, match="registered twice"):
        cli.command("train", "again", group="t2i")(lambda a: None)
    with pytest.raises(ValueError, match="unknown group 'nope'"):
        cli.command("new", "x", group="nope")
