"""The ``moe`` front door: ``moe --help`` lists every command with a line, each command's ``--help``
exits 0 and is its console script's own text, and the front door imports no torch."""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from moe_dist.commands import COMMANDS, main

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = {"moe-train": "moe_dist.train:main", "moe-plan": "moe_dist.plan.cli:main",
           "moe-prepare-data": "moe_dist.data.prepare:main", "moe-ckpt": "moe_dist.checkpoint.cli:main",
           "moe-consolidate": "moe_dist.export.consolidate_cli:main",
           "moe-generate": "moe_dist.export.inference:generate_main"}


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def _help_of(argv: list[str]) -> tuple[int, str]:
    """Exit code and stdout of ``main(argv)`` in this process (argparse's --help raises SystemExit)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code or 0
    return code, out.getvalue()


def test_help_lists_every_command_with_a_line():
    code, text = _help_of(["--help"])
    assert code == 0
    listed = {line.split()[0]: line for line in text.splitlines() if line.startswith("  ")}
    assert list(listed) == ["train", "plan", "prepare-data", "ckpt", "consolidate", "generate"]
    assert all(len(line.split()) > 2 for line in listed.values()), listed


def test_each_command_runs_its_console_script_function():
    """``moe <name>`` calls what ``moe-<name>`` (pyproject.toml) calls."""
    text = (ROOT / "pyproject.toml").read_text()
    for script, target in SCRIPTS.items():
        assert f'{script} = "{target}"' in text, f"pyproject.toml: {script} should point to {target}"
        module, function, _ = COMMANDS[script.removeprefix("moe-")]
        assert f"{module}:{function}" == target
    assert 'moe = "moe_dist.commands:main"' in text


@pytest.mark.parametrize("name", [n for n in COMMANDS if n != "train"])
def test_command_help_exits_0_and_is_the_scripts_text(name):
    code, text = _help_of([name, "--help"])
    assert code == 0, f"moe {name} --help exited {code}"
    assert text.startswith(f"usage: moe-{name}"), text[:200]
    module, function = SCRIPTS[f"moe-{name}"].split(":")
    saved, sys.argv = sys.argv, [f"moe-{name}", "--help"]
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as e:
            getattr(importlib.import_module(module), function)()
    finally:
        sys.argv = saved
    assert e.value.code in (0, None) and out.getvalue() == text


def test_train_help_through_python_m_moe_dist():
    """``moe train`` in a process of its own (moe-train's main leaves with os._exit after a run)."""
    moe = subprocess.run([sys.executable, "-m", "moe_dist", "train", "--help"], capture_output=True, text=True,
                         timeout=120, env=_env(), cwd=ROOT)
    script = subprocess.run([sys.executable, "-c", "import sys; from moe_dist.train import main; "
                             "sys.argv = ['moe-train', '--help']; main()"],
                            capture_output=True, text=True, timeout=120, env=_env(), cwd=ROOT)
    assert moe.returncode == 0, moe.stderr[-2000:]
    assert moe.stdout.startswith("usage: moe-train") and moe.stdout == script.stdout


def test_unknown_command_names_the_choices():
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert main(["trian"]) == 2
    assert "unknown command 'trian'" in err.getvalue() and "train, plan" in err.getvalue()


def test_front_door_imports_no_torch():
    code = "import sys, moe_dist.commands; sys.exit('torch' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], timeout=60, env=_env(), cwd=ROOT)
    assert res.returncode == 0, "importing moe_dist.commands imports torch: moe --help would be slow"
