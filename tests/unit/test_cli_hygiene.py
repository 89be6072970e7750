"""Every command line refuses in one line and names what the user most likely meant: no prefix
matching (``--max-step`` is not ``--max-steps``), "did you mean" for flags, choices, ``--set`` fields,
presets and commands, sizes without a unit, and data-file lines counted from 1 in plain words."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from moe_dist.cli_args import Parser, did_you_mean, field_hint
from moe_dist.commands import COMMANDS, main as moe_main
from moe_dist.config import ConfigError, get_preset
from moe_dist.data.corpus import load_documents
from moe_dist.config import DataConfig
from moe_dist.data.errors import DataError
from moe_dist.data.lines import bad_line
from moe_dist.run.cli import parse
from moe_dist.run.threads import choose_threads


def _moe(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    return subprocess.run([sys.executable, "-m", "moe_dist", *args], capture_output=True, text=True, env=env,
                          timeout=120)


def test_max_step_is_refused_with_the_flag_meant():
    proc = _moe("train", "--max-step", "1", "--print-params")
    assert proc.returncode == 2, proc
    lines = proc.stderr.strip().splitlines()
    assert lines == ["moe-train: error: unknown flag --max-step; did you mean --max-steps? (see moe-train --help)"]


def test_gpu_mem_without_unit_is_refused_with_the_hint():
    proc = _moe("plan", "--gpu-mem", "24")
    assert proc.returncode == 2, proc
    out = (proc.stdout + proc.stderr).strip()
    assert out == "error: --gpu-mem 24: a size needs a unit (B, KB, MB, GB, TB); did you mean 24GB?"


@pytest.mark.parametrize("module", ["moe_dist.run.cli", "moe_dist.plan.cli", "moe_dist.checkpoint.cli",
                                    "moe_dist.export.consolidate_cli", "moe_dist.data.prepare"])
def test_every_parser_has_no_prefix_matching(module):
    import importlib

    parser = importlib.import_module(module).build_parser()
    assert isinstance(parser, Parser) and parser.allow_abbrev is False


def test_generate_parser_has_no_prefix_matching():
    from moe_dist.export.inference import build_generate_parser

    assert build_generate_parser().allow_abbrev is False


def test_a_flag_typo_is_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        parse(["--ouput-dir", "x"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["moe-train: error: unknown flag --ouput-dir; did you mean --output-dir? (see moe-train --help)"]
    with pytest.raises(SystemExit):
        parse(["--max-step=3"])
    assert "did you mean --max-steps?" in capsys.readouterr().err


def test_choices_and_commands_suggest(capsys):
    from moe_dist.plan.cli import main as plan_main

    with pytest.raises(SystemExit):
        plan_main(["--preset", "tinyy"])
    assert "'tinyy' is not one of tiny, 100m" in capsys.readouterr().err
    assert moe_main(["trian"]) == 2
    assert "unknown command 'trian'; did you mean train?" in capsys.readouterr().err
    assert set(COMMANDS) >= {"train", "plan"}


def test_set_fields_point_to_the_real_ones():
    with pytest.raises(ConfigError, match=r"train has no field 'lr'; did you mean --lr .*train.muon_lr"):
        parse(["--set", "train.lr=0.1"])
    with pytest.raises(ConfigError, match=r"did you mean model.d_model\?"):
        parse(["--set", "train.d_model=64"])
    with pytest.raises(ConfigError, match=r"did you mean train.max_steps\?"):
        parse(["--set", "train.max_step=3"])
    assert field_hint("zzzz", ["model.d_model"]) == ""
    assert did_you_mean("fsdp", ["deepspeed", "fsdp2"]) == "; did you mean fsdp2?"


def test_presets_suggest():
    with pytest.raises(ConfigError, match=r"unknown preset '10m'; did you mean 100m\?"):
        get_preset("10m")


def test_seq_len_and_micro_batch_flags():
    _, cfg = parse(["--seq-len", "64", "--micro-batch-size", "2"])
    assert (cfg.train.seq_len, cfg.train.micro_batch_size) == (64, 2)


def test_consolidate_sizes_need_a_unit():
    from moe_dist.export.consolidate_cli import main as consolidate_main

    proc = subprocess.run([sys.executable, "-m", "moe_dist.export.consolidate_cli", "/no/such", "--format",
                           "safetensors", "--max-shard-size", "500"], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=os.getcwd()), timeout=120)
    assert proc.returncode == 2 and "--max-shard-size 500: a size needs a unit" in proc.stderr, proc
    assert "did you mean 500GB?" in proc.stderr and consolidate_main is not None


# --------------------------------------------------------------------------- data files, by line
def _write(path, data: bytes):
    path.write_bytes(data)
    return str(path)


def test_bad_jsonl_lines_are_named_from_one(tmp_path):
    rows = b'{"text": "a"}\n{"text": "b"}\n\n{"text": "\xff c"}\n'
    f = _write(tmp_path / "enc.jsonl", rows)
    assert bad_line(f) == "line 4: not UTF-8 text (byte 0xff at column 11); save the file as UTF-8"
    with pytest.raises(DataError) as e:
        load_documents(DataConfig(data_files=[f]))
    assert str(e.value) == f"data file {f}: line 4: not UTF-8 text (byte 0xff at column 11); save the file as UTF-8"
    f = _write(tmp_path / "json.jsonl", b'{"text": "a"}\n{"text": "b"\n')
    assert bad_line(f).startswith("line 2: not valid JSON (Expecting ',' delimiter at column 13)")
    with pytest.raises(DataError, match=r"json.jsonl: line 2: not valid JSON"):
        load_documents(DataConfig(data_files=[f]))
    f = _write(tmp_path / "list.jsonl", b'{"text": "a"}\n[1, 2]\n')
    assert bad_line(f).startswith("line 2: a JSON list, not an object")
    f = _write(tmp_path / "num.jsonl", b'{"text": "a"}\n\n{"text": 5}\n')
    with pytest.raises(DataError, match=r"num.jsonl: line 3: field 'text' is a JSON int, not text"):
        load_documents(DataConfig(data_files=[f]))
    f = _write(tmp_path / "ok.jsonl", b'{"text": "a"}\n\n' + json.dumps({"text": "\u00e9"}).encode() + b"\n")
    assert bad_line(f) is None and bad_line(f, limit=1) is None
    assert bad_line(_write(tmp_path / "x.parquet", b"nope")).startswith("not a parquet file")


def test_plain_runs_choose_threads():
    assert choose_threads({}, cores=2, load=1.9) == 1
    assert choose_threads({}, cores=16, load=0.2) == 16
    assert choose_threads({}, cores=4, load=9.0) == 1
    assert choose_threads({"OMP_NUM_THREADS": "3"}, cores=16, load=0.0) is None
    assert choose_threads({"LOCAL_RANK": "0", "WORLD_SIZE": "2"}, cores=16, load=0.0) is None
