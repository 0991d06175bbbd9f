"""Every command the README and the configs' comments show parses as written: each
``dnis <stage>``, ``dnis-synth`` and ``dnis-preprocess`` line goes through its stage's
own argument parser, and each ``torchx run ... launch/components.py:<component>`` line
through TorchX's (and the stage arguments the component builds through the stage's).

The commands are not run (their data paths are examples); parsing stops the stage right
after its arguments are accepted."""

from __future__ import annotations

import argparse
import importlib
import re
import shlex
from pathlib import Path

import pytest
from torchx.specs.builders import materialize_appdef
from torchx.specs.finder import get_component

from launch.cli import STAGES

ROOT = Path(__file__).resolve().parents[1]
ENTRY_POINTS = {"dnis-synth": "pipeline.data.synth", "dnis-preprocess": "pipeline.data.preprocess"}
COMMAND = re.compile(r"(?:^|[\s`])((?:dnis(?:-synth|-preprocess)?|torchx run) (?!\|)[^`\n]*)")


def documented_commands() -> list[tuple[str, str]]:
    """``(where, command)`` for every command in README.md's code blocks and tables and in
    the configs' comments. Prose that names a stage or a flag, usage lines (``[--x]``)
    and examples with placeholders (``...``) are not commands."""
    found = []
    sources = [ROOT / "README.md", *sorted((ROOT / "configs").glob("*.yaml"))]
    for path in sources:
        in_block = False
        for number, line in enumerate(path.read_text().splitlines(), 1):
            in_block ^= line.startswith("```")
            shown = line.lstrip().startswith("#") if path.suffix == ".yaml" else in_block or line.startswith("|")
            for command in COMMAND.findall(line) if shown else ():
                command = command.split(" # ")[0].strip().rstrip("\\").strip()
                if "..." in command or "[" in command or len(command.split()) < 3:
                    continue
                found.append((f"{path.name}:{number}", command))
    return found


class Parsed(Exception):
    """Raised right after a stage's parser accepted its arguments."""


def parse_stage(module: str, args: list[str]) -> None:
    """Run ``module.main(args)`` until its parser has accepted ``args``."""
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        original(self, args, namespace)
        raise Parsed

    main = importlib.import_module(module).main
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
        with pytest.raises(Parsed):
            main(args)


def test_the_readme_shows_commands_of_every_kind():
    commands = [c for _, c in documented_commands()]
    assert any(c.startswith("dnis compare") for c in commands)
    assert any(c.startswith("torchx run") for c in commands)
    assert any(c.startswith("dnis-preprocess") for c in commands)
    assert len(commands) > 20


@pytest.mark.parametrize("where, command", documented_commands())
def test_documented_command_parses_as_written(where, command):
    words = shlex.split(command)
    if words[0] == "torchx":
        spec = next(w for w in words if "launch/components.py:" in w)
        component = get_component(str(ROOT / spec)).fn
        app = materialize_appdef(component, words[words.index(spec) + 1:])
        stage_command = shlex.split(app.roles[0].args[-1])
        module = stage_command[stage_command.index("-m") + 1]
        parse_stage(module, stage_command[stage_command.index("-m") + 2:])
    elif words[0] == "dnis":
        assert words[1] in STAGES, f"{where}: no stage {words[1]!r}"
        parse_stage(STAGES[words[1]], words[2:])
    else:
        parse_stage(ENTRY_POINTS[words[0]], words[1:])
