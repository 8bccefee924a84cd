"""README.md and CI stay in step: exactly two set-up commands, and .ci/run runs the README's test command."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def setup_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Set up and run", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", section, flags=re.S)


def test_readme_has_exactly_two_setup_commands() -> None:
    commands = setup_commands()
    assert len(commands) == 2
    assert all("\n" not in command for command in commands)
    assert "jlcm-onnx compress" in commands[0] and "models/minilm.py evaluate" in commands[0]
    assert "pytest" in commands[1]


def test_ci_runs_the_readme_test_command() -> None:
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert setup_commands()[1] in ci


def test_readme_numbers_are_generated() -> None:
    readme = (ROOT / "README.md").read_text()
    numbers = readme.split("<!-- numbers:start -->", 1)[1].split("<!-- numbers:end -->", 1)[0]
    assert "python bench/minilm_numbers.py" in numbers
    assert "| jlcm-onnx 4-bit, data-free |" in numbers
