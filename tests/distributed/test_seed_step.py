"""One optimizer step after ``moe-ckpt import-seed``, on the run's first batch with dropout and router
noise off, equals a reference step of the seed's maths written here: Muon (momentum lerp, Nesterov
blend, Newton-Schulz quintic 5 steps in fp32, scale sqrt(max(1, rows/cols)), no weight decay) on the
matrices, torch AdamW (decay 0.1, bias correction from the imported step) on embedding and norms,
gradients averaged over the micro-batches, and the seed's grad-norm clip where the engine applies it.

Measured (CPU, fp32, this model; the step moves weights by up to 5.8e-03): DeepSpeed ZeRO-2 vs the
reference without clipping: max |dW| 6.2e-08 on Muon's matrices (DeepSpeed's Gram Newton-Schulz vs the
seed's standard one), 3.7e-09 on AdamW's; FSDP2 vs the reference with the clip at 1.0: 7.5e-08 and
7.5e-09. DeepSpeed's Muon cannot clip gradients (``parallel/deepspeed/config.py``): against the
clipped reference it is off by 2.3e-04 (Muon) and 5.5e-04 (AdamW) here, where the norm is 1.12.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from moe_dist.config import apply_overrides, get_preset, load_config_file
from moe_dist.seed.importer import import_seed
from moe_dist.seed.keys import our_name

from ..seed_fixture import make_seed_checkpoint
from ..seed_reference import seed_newton_schulz
from ..seed_reference import seed_forward
from .harness import check_ranks, run_ranks
from .trainrun import CPU_JSON, TRAIN

pytestmark = pytest.mark.distributed

START = 30
# Measured max |dW| (CPU, fp32): DeepSpeed ZeRO-2 Muon 6.2e-08, its AdamW 3.7e-09; FSDP2 (clipping) in the ids below.
BOUND_MUON, BOUND_ADAM = 5e-7, 1e-7


def _reference_step(written: dict, batches: list[torch.Tensor], lr_muon: float, lr_adam: float,
                    clip_norm: float) -> dict:
    sd = {k: v.clone().requires_grad_(True) for k, v in written["model"].items() if k != "lm_head.weight"}
    sd["lm_head.weight"] = sd["token_embedding.weight"]
    for block in batches:  # each micro-batch's loss, averaged (DeepSpeed scales by 1 / grad accumulation)
        logits, aux = seed_forward(sd, 4, 2, block[:, :-1], with_aux=True)
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), block[:, 1:].reshape(-1)) + aux
        (loss / len(batches)).backward()
    params = {k: v for k, v in sd.items() if k != "lm_head.weight"}
    norm = torch.sqrt(sum(p.grad.pow(2).sum() for p in params.values()))
    clip = min(1.0, clip_norm / (float(norm) + 1e-6)) if clip_norm else 1.0
    print(f"reference gradient norm {float(norm):.3f}, clip coefficient {clip:.4f}")
    out = {}
    with torch.no_grad():
        for pos, name in enumerate(written["muon_names"]):
            p, g = params[name], params[name].grad * clip
            m = written["muon_state"].get(pos, {"momentum_buffer": torch.zeros_like(p)})["momentum_buffer"].clone()
            m.lerp_(g, 1 - 0.95)
            u = seed_newton_schulz(g.lerp(m, 0.95))
            out[name] = p - lr_muon * math.sqrt(max(1.0, p.size(0) / p.size(1))) * u
        for pos, name in enumerate(written["adam_names"]):
            p, g, st = params[name], params[name].grad * clip, written["adam_state"][pos]
            t = float(st["step"]) + 1
            m = 0.9 * st["exp_avg"] + 0.1 * g
            v = 0.999 * st["exp_avg_sq"] + 0.001 * g * g
            step = lr_adam * (m / (1 - 0.9 ** t)) / ((v / (1 - 0.999 ** t)).sqrt() + 1e-8)
            out[name] = p * (1 - lr_adam * 0.1) - step
    return out


@pytest.mark.parametrize("layout, clip", [
    (("--deepspeed-config", CPU_JSON, "--zero-stage", "2"), 0.0),  # DeepSpeed's Muon does not clip (config.py)
    pytest.param(("--engine", "fsdp2"), 1.0, marks=pytest.mark.slow),  # FSDP2 clips the gradients, as the seed
], ids=["deepspeed-zero2-noclip", "fsdp2-clip"])
def test_one_step_after_import_is_the_seeds_step(tmp_path, layout, clip):
    from moe_dist.data.loader import build_data
    from moe_dist.data.sampler import GlobalCursorSampler
    from moe_dist.run.optim import LRSchedule

    src, run = tmp_path / "checkpoint_step_60.pt", tmp_path / "run"
    written = make_seed_checkpoint(src, opt_steps=START)
    import_seed(str(src), str(run), {"data.max_corpus_bytes": 300000, "train.eval_every": 0, "model.dropout": 0.0,
                                     "model.router_noise_std": 0.0}, log=lambda _l: None)
    argv = [TRAIN, "--config", str(run / "config.yaml"), "--output-dir", str(run), "--resume", "auto",
            "--stop-at-step", str(START + 1), *layout]
    check_ranks(run_ranks(argv, 1, 240, env={"TORCHDYNAMO_DISABLE": "1"}))

    cfg = apply_overrides(get_preset("4090"), load_config_file(str(run / "config.yaml")))
    data = build_data(cfg.data, cfg.train.seq_len, cfg.train.seed)
    sampler = GlobalCursorSampler(len(data.train_blocks), cfg.train.global_batch_size, cfg.train.seed)
    micro = sampler.rank_share(sampler.next_global_batch(), 0, 1, cfg.train.micro_batch_size)
    lrs = LRSchedule.from_config(cfg.train).lrs(START)
    want = _reference_step(written, [data.train_blocks[idx] for idx in micro], lrs["muon"], lrs["adamw"], clip)

    dcp_to_torch_save(str(run / "checkpoints" / f"checkpoint_step_{START + 1}"), str(tmp_path / "after.pt"))
    got = torch.load(tmp_path / "after.pt", weights_only=True)["model"]
    muon_err = max(float((got[our_name(n)] - want[n]).abs().max()) for n in written["muon_names"])
    adam_err = max(float((got[our_name(n)] - want[n]).abs().max()) for n in written["adam_names"])
    moved = max(float((got[our_name(n)] - written["model"][n]).abs().max()) for n in written["muon_names"])
    print(f"one step after import: max |dW| Muon {muon_err:.2e}, AdamW {adam_err:.2e}; the step moved {moved:.2e}")
    assert moved > 100 * BOUND_MUON  # the step did happen
    assert muon_err <= BOUND_MUON and adam_err <= BOUND_ADAM
