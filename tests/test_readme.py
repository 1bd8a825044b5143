"""The README's commands work as written: every file they name exists, the config a yaml block
says it shows is that file, and the commands that take seconds on a CPU run (the rest are checked
with --print_config, which parses and validates them without training)."""
import os
import re
import shlex

import pytest
import yaml

import sweep
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
with open(os.path.join(ROOT, "README.md")) as f:
    README = f.read()
# Files of this repository a command can name (run folders, data and outputs are made by the commands).
REPO_FILE = re.compile(r"(?<![\w/.-])(configs/[\w.-]+\.yaml|[\w-]+\.(?:py|sh|sub)|requirements[\w-]*\.txt)(?![\w/-])")


def blocks(lang):
    return re.findall(rf"```{lang}\n(.*?)```", README, re.S)


def commands():
    """(command words, the comment after it) for each command of the README's bash blocks."""
    found = []
    for block in blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line, _, comment = (" " + line).partition(" #")  # a comment line, or one after a command
            for part in line.split("&&"):
                if part.strip():
                    found.append((shlex.split(part), comment.strip()))
    return found


def test_every_file_a_command_names_exists():
    named = {name for block in blocks("bash") for name in REPO_FILE.findall(block)}
    assert {"train.py", "sweep.py", "configs/lr_sweep.yaml", "slurm.sh", "condor.sub"} <= named  # the parser sees them
    missing = sorted(name for name in named if not os.path.isfile(os.path.join(ROOT, name)))
    assert not missing, f"README commands name files that do not exist: {missing}"


def test_a_yaml_block_that_names_a_config_is_that_config():
    shown = [block for block in blocks("yaml") if re.match(r"# (configs/\S+\.yaml)", block)]
    assert shown
    for block in shown:
        path = re.match(r"# (configs/\S+\.yaml)", block).group(1)
        with open(os.path.join(ROOT, path)) as f:
            assert yaml.safe_load(block) == yaml.safe_load(f), path


def test_train_commands_parse_and_validate(capsys, monkeypatch):
    """Every `python train.py CONFIG ...` command, with --print_config: its keys, values and sweep job are valid."""
    monkeypatch.chdir(ROOT)
    runs = [words[2:] for words, _ in commands() if words[:2] == ["python", "train.py"] and words[2:3] != ["--help"]]
    assert len(runs) >= 5
    for args in runs:
        assert train.main(args + ["--print_config"]) == 0, args
        assert yaml.safe_load(capsys.readouterr().out)["data_dir"], args
    with pytest.raises(SystemExit) as e:
        train.main(["--help"])
    assert e.value.code == 0 and "config keys" in capsys.readouterr().out


def test_sweep_commands_run_and_print_what_their_comments_say(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    runs = [(words[2:], comment) for words, comment in commands() if words[:2] == ["python", "sweep.py"]]
    assert {args[-1] for args, _ in runs} >= {"--count", "--list", "5"}
    for args, comment in runs:
        assert sweep.main(args) in (None, 0), args
        out = capsys.readouterr().out
        if args[-1] == "--count":
            assert out.strip() == comment, "the README's count is not what sweep.py prints"
        elif args[-1] == "--list":
            assert out.split("\n")[0].split() == comment.removeprefix("table:").replace(",", "").split()
        elif args[-1] == "--check":
            assert out.endswith(": every config is valid\n")
        else:
            assert out.startswith("# job 5 of") and "\nlr: 0.004\n" in out
