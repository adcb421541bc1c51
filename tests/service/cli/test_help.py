"""The ``imagebatch`` command as a user first meets it: ``--help`` on the command and on each
subcommand answers at once, says what the command does and explains every option.

Each runs ``python -m service.cli`` as a real process; nothing here needs Redis or an API.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

SUBCOMMANDS = {
    "up": "whole stack",
    "api": "HTTP API",
    "worker": "Celery worker",
    "beat": "sweep",
    "simulator": "OpenAI",
    "submit": "submit a job",
    "status": "show a job",
    "download": "download",
}


def imagebatch(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
    )


def undocumented(help_text: str) -> list[str]:
    """Arguments argparse lists without a word of help (an option line with nothing after it,
    and no indented help on the line below)."""
    lines = help_text.splitlines()
    missing = []
    for n, line in enumerate(lines):
        m = re.match(r"^  (\S.*?)(?:\s{2,}(\S.*))?$", line)
        if not m or m.group(2) or line.startswith("   "):
            continue
        nxt = lines[n + 1] if n + 1 < len(lines) else ""
        if re.match(r"^\s{10,}\S", nxt):
            continue  # argparse wrapped the help onto the next line
        if m.group(1).startswith(("-h", "{")):
            continue
        missing.append(m.group(1))
    return missing


def test_the_command_lists_every_subcommand_with_what_it_does(tmp_path: Path) -> None:
    out = imagebatch("--help", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    for name, words in SUBCOMMANDS.items():
        listed = re.search(rf"^\s+{name}\s+(.+)$", out.stdout, re.MULTILINE)
        assert listed, f"{name} is not listed"
        assert words.lower() in out.stdout.lower()


@pytest.mark.parametrize("name", sorted(SUBCOMMANDS))
def test_each_subcommand_describes_itself_and_every_option(name: str, tmp_path: Path) -> None:
    out = imagebatch(name, "--help", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"usage: imagebatch {name}")
    assert SUBCOMMANDS[name].lower() in out.stdout.lower(), "no description of the command"
    assert undocumented(out.stdout) == []


def test_worker_help_names_the_queues(tmp_path: Path) -> None:
    out = imagebatch("worker", "--help", cwd=tmp_path)
    for queue in ("control", "collect", "sync"):
        assert queue in out.stdout


def test_no_subcommand_is_a_usage_error(tmp_path: Path) -> None:
    out = imagebatch(cwd=tmp_path)
    assert out.returncode == 2
    assert "usage: imagebatch" in out.stderr and "required" in out.stderr


def test_an_unknown_subcommand_names_the_choices(tmp_path: Path) -> None:
    out = imagebatch("serve", cwd=tmp_path)
    assert out.returncode == 2
    assert "invalid choice: 'serve'" in out.stderr and "worker" in out.stderr
