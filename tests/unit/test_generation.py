"""Generation with a KV cache: the cached forward gives the uncached logits (1e-5), greedy sampling
the same tokens, also past model.max_seq_len; --min-new-tokens / --ignore-eos; the stream writes the
same text as the one-shot print; loading a .pt or safetensors export imports neither DCP, DeepSpeed
nor Accelerate."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from moe_dist import model as lm
from moe_dist.config import ModelConfig
from moe_dist.export.generation import GenerationTimes, generate
from moe_dist.export.inference import generate_main
from moe_dist.model.kv_cache import KVCache

from .test_consolidate import TINY, make_checkpoint


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = ModelConfig(**{**TINY, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 24})  # GQA too
    return lm.build(cfg).eval()


def test_cached_logits_match_the_full_forward(model):
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full, _ = model(tokens, return_aux_loss=False)
        cache = KVCache.for_model(model, batch=2)
        parts = [model(tokens[:, :7], return_aux_loss=False, cache=cache)[0],   # prefill
                 model(tokens[:, 7:12], return_aux_loss=False, cache=cache)[0]]  # a chunk past position 0
        parts += [model(tokens[:, t:t + 1], return_aux_loss=False, cache=cache)[0] for t in range(12, 20)]
    cached = torch.cat(parts, dim=1)
    assert cache.pos == 20
    torch.testing.assert_close(cached, full, rtol=0, atol=1e-5)


def test_cache_refuses_to_overflow(model):
    cache = KVCache.for_model(model, max_len=4)
    with torch.no_grad(), pytest.raises(ValueError, match="KV cache full: 5 positions, room for 4"):
        model(torch.zeros(1, 5, dtype=torch.long), return_aux_loss=False, cache=cache)


@pytest.mark.parametrize("new", [6, 30])  # 30: past max_seq_len (24), where the window slides
def test_greedy_tokens_are_the_same_with_and_without_the_cache(model, new):
    prompt = [5, 17, 3, 99, 42]
    with_cache = generate(model, prompt, new, temperature=0, ignore_eos=True)
    without = generate(model, prompt, new, temperature=0, ignore_eos=True, use_cache=False)
    assert with_cache == without and len(with_cache) == new


def test_sampling_with_a_seed_is_the_same_with_and_without_the_cache(model):
    def run(use_cache: bool) -> list[int]:
        g = torch.Generator().manual_seed(3)
        return generate(model, [1, 2, 3], 12, temperature=0.9, top_k=20, generator=g, use_cache=use_cache)
    assert run(True) == run(False)


def test_min_new_tokens_and_ignore_eos(model):
    first = generate(model, [1, 2], 1, temperature=0)[0]
    assert generate(model, [1, 2], 8, temperature=0, eos_id=first) == []  # greedy's first pick is EOS: stop
    held = generate(model, [1, 2], 8, temperature=0, eos_id=first, min_new_tokens=3)
    assert len(held) >= 3 and first not in held[:3]
    times = GenerationTimes()
    on = []
    kept = generate(model, [1, 2], 8, temperature=0, eos_id=first, ignore_eos=True, on_token=on.append, times=times)
    assert len(kept) == 8 and kept[0] == first and on == kept
    assert times.tokens == 8 and 0 < times.first_token_s <= times.total_s and len(times.per_token_s) == 8


def test_stream_prints_what_the_one_shot_print_does(tmp_path, capsys):
    _, folder = make_checkpoint(tmp_path, TINY)
    argv = [str(folder), "--prompt", "Hi", "--max-new-tokens", "12", "--seed", "3", "--ignore-eos"]
    assert generate_main(argv) == 0
    streamed = capsys.readouterr()
    assert generate_main([*argv, "--no-stream"]) == 0
    assert capsys.readouterr().out == streamed.out and streamed.out.startswith("Hi")
    assert "12 new tokens" in streamed.err and "tokens/s" in streamed.err and "first token" in streamed.err
    assert generate_main([*argv, "--no-stream", "--no-cache"]) == 0
    assert capsys.readouterr().out == streamed.out


def test_loading_an_export_imports_no_dcp_deepspeed_or_accelerate(tmp_path):
    from moe_dist.export.consolidate_cli import main as consolidate_main

    _, folder = make_checkpoint(tmp_path, TINY)
    pt, st = tmp_path / "w.pt", tmp_path / "st"
    assert consolidate_main([str(folder), "-o", str(pt), "-q"]) == 0
    assert consolidate_main([str(folder), "--format", "safetensors", "-o", str(st), "-q"]) == 0
    probe = textwrap.dedent("""
        import sys
        from moe_dist.export.inference import load_model_for_inference
        model, cfg, step = load_model_for_inference(sys.argv[1])
        heavy = [m for m in ("torch.distributed.checkpoint", "deepspeed", "accelerate") if m in sys.modules]
        print(step, heavy)
    """)
    for path in (pt, st):
        proc = subprocess.run([sys.executable, "-c", probe, str(path)], capture_output=True, text=True, timeout=120,
                              env=dict(os.environ, PYTHONPATH=os.getcwd()))
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert proc.stdout.strip() == "7 []", (path, proc.stdout)


def test_generate_may_only_lengthen_the_context(tmp_path, capsys):
    _, folder = make_checkpoint(tmp_path, TINY)
    argv = [str(folder), "--max-new-tokens", "40", "--temperature", "0", "--ignore-eos", "--no-stream"]
    assert generate_main([*argv, "--set", "model.max_seq_len=64"]) == 0
    assert "40 new tokens" in capsys.readouterr().err
    assert generate_main([*argv, "--set", "model.d_model=64"]) == 2
    assert "generation can only change model.max_seq_len" in capsys.readouterr().err
