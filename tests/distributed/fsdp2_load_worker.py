"""One rank of a plain FSDP2 model reading a moe_dist checkpoint (``test_checkpoint_interop.py``).

Builds the model from the checkpoint's own config, shards every block and the root with
``fully_shard`` (2 gloo ranks, even ``Shard(0)`` of every tensor: other boxes than the saving
ZeRO ranks owned), loads ``model.*`` through ``get_model_state_dict`` -> ``dcp.load`` ->
``set_model_state_dict``, runs the given tokens and writes rank 0's logits.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
from torch.distributed.fsdp import fully_shard


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--tokens", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    dist.init_process_group("gloo")
    from moe_dist import model as lm
    from moe_dist.checkpoint.reader import read_train_state, run_config
    from pathlib import Path

    cfg = run_config(read_train_state(Path(args.ckpt))["config"], Path(args.ckpt))
    torch.manual_seed(1234)  # other weights than the checkpoint's, so a load that does nothing shows
    model = lm.build(cfg.model, device=torch.device("cpu"))
    for block in model.layers:
        fully_shard(block)
    fully_shard(model)
    sd = get_model_state_dict(model)
    dcp.load({"model": sd}, checkpoint_id=args.ckpt)
    set_model_state_dict(model, sd)
    model.eval()
    tokens = torch.load(args.tokens, weights_only=True)
    with torch.no_grad():
        logits, _ = model(tokens, return_aux_loss=False)
    if dist.get_rank() == 0:
        torch.save(logits.float(), args.out)
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)


if __name__ == "__main__":
    main()
