"""Our checkpoints read by PyTorch's own tools, with no moe_dist code on the reading side.

A 2-rank ZeRO-2, EP-2 AdamW run saves (tied embeddings: the head is saved under both names).
Then:
* ``dcp_to_torch_save`` assembles it into ``{"model": ..., "optim": {"state": ...}}`` whose
  ``model`` part ``MoETransformer.load_state_dict`` takes as is (strict), giving the same logits
  as our own loader;
* a plain FSDP2 copy of the model (``fully_shard`` per block, 2 gloo ranks, other boxes than the
  saving ranks owned) loads ``model.*`` with ``set_model_state_dict`` and gives the same logits;
* the optimizer keys are exactly the ones ``get_optimizer_state_dict`` (which FSDP2 and torchtitan
  use) gives for AdamW, once each stacked expert matrix is named per expert.

The per-expert names resolve on the model as attributes (``experts.<e>.w_up.weight``:
``model/experts.GroupedExperts.__getattr__``), which is what torch's state-dict functions need.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moe_dist import model as lm
from moe_dist.checkpoint import layout
from moe_dist.checkpoint.dcp_state import read_saved_keys
from moe_dist.export.inference import load_model_for_inference

from .harness import run_and_check
from .trainrun import train

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, torch.Tensor, torch.Tensor]:
    """(checkpoint folder, tokens [2, 16], our loader's logits for them)."""
    out = tmp_path_factory.mktemp("interop") / "run"
    train(out, 2, "--max-steps", "2", "--ep-size", "2", "--set", "train.optimizer=adamw")
    ckpt = layout.resolve_checkpoint(str(out))
    model, _, _ = load_model_for_inference(ckpt)
    tokens = torch.randint(0, 200, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, _ = model(tokens, return_aux_loss=False)
    return ckpt, tokens, logits


def test_dcp_to_torch_save_gives_a_state_dict_the_model_loads_as_is(saved, tmp_path):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    ckpt, tokens, reference = saved
    dcp_to_torch_save(str(ckpt), str(tmp_path / "full.pt"))
    sd = torch.load(tmp_path / "full.pt", weights_only=True)
    assert set(sd) == {"model", "optim"}, sorted(sd)
    _, cfg, _ = load_model_for_inference(ckpt)
    torch.manual_seed(99)  # other weights, so a partial load shows
    model = lm.build(cfg.model, device="cpu")
    model.load_state_dict(sd["model"])  # strict: every name, every shape
    assert model.cfg.tie_embeddings and torch.equal(sd["model"]["lm_head.weight"], sd["model"]["embed.weight"])
    with torch.no_grad():
        logits, _ = model.eval()(tokens, return_aux_loss=False)
    assert torch.equal(logits, reference)
    step = sd["optim"]["state"]["layers.0.attn.wq.weight"]["step"]
    assert step.dim() == 0 and float(step) == 2.0


def test_fsdp2_model_loads_our_checkpoint_with_set_model_state_dict(saved, tmp_path):
    ckpt, tokens, reference = saved
    torch.save(tokens, tmp_path / "tokens.pt")
    out = tmp_path / "fsdp2_logits.pt"
    run_and_check(["-m", "tests.distributed.fsdp2_load_worker", "--ckpt", str(ckpt), "--tokens",
                   str(tmp_path / "tokens.pt"), "--out", str(out)], 2, 180)
    logits = torch.load(out, weights_only=True)
    assert (logits - reference).abs().max().item() <= 1e-5, (logits - reference).abs().max()


def test_optimizer_keys_are_the_ones_get_optimizer_state_dict_uses(saved):
    """AdamW after one step, flattened the way DCP flattens ``{"optim": get_optimizer_state_dict(...)}``
    (parameter groups aside: the LR schedule lives in train_state.json), key for key, but for one
    rule: torch names a stacked expert matrix once (``experts.w_up``), the checkpoint names its rows
    per expert (``experts.<e>.w_up.weight``), as ``state_dict()`` does (``model.experts.expert_rows``)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    from moe_dist.model.experts import expert_rows

    ckpt, tokens, _ = saved
    model, _, _ = load_model_for_inference(ckpt)
    opt = torch.optim.AdamW(model.parameters(), lr=0.0)
    logits, aux = model.train()(tokens)
    (logits.float().mean() + aux).backward()
    for p in model.parameters():  # an expert no token reached has no grad; torch's AdamW then makes no state
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    opt.step()
    osd = get_optimizer_state_dict(model, opt)
    assert any(expert_rows(model, name) for name in osd["state"])  # the rule is exercised
    theirs = {f"optim.state.{row}.{state}" for name, states in osd["state"].items()
              for row in expert_rows(model, name) or [name] for state in states}
    ours = {k for k in read_saved_keys(str(ckpt)).sizes if k.startswith("optim.")}
    assert theirs == ours, sorted(theirs ^ ours)[:6]
