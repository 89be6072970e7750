"""moe-consolidate and the inference loaders on synthetic DCP checkpoints (no process group needed,
except one world-1 gloo group to write a chunked checkpoint like many ranks would)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from moe_dist.checkpoint import layout
from moe_dist.checkpoint.errors import CheckpointError
from moe_dist.checkpoint.fragment import box_view, flat_boxes
from moe_dist.checkpoint.keys import FORMAT_VERSION
from moe_dist.checkpoint.manifest import write_manifest
from moe_dist.config import ModelConfig, RunConfig, TrainConfig
from moe_dist.checkpoint.reader import Checkpoint, CheckpointReader
from moe_dist.export.consolidate import verify_output
from moe_dist.export.consolidate_cli import build_parser, main
from moe_dist.export.errors import ConsolidateError
from moe_dist.export.inference import generate_main, load_checkpoint, load_model_for_inference
from moe_dist import model as lm

from moe_dist.parallel.engine import per_expert_tensors

from ..corrupt import flip_bits

TINY = dict(vocab_size=320, d_model=32, n_layers=2, n_heads=4, d_ff=48, num_experts=4, top_k=2, max_seq_len=32)


def make_checkpoint(root: Path, model_kw: dict, step: int = 7, seed: int = 0, chunks: int = 1) -> tuple:
    """A checkpoint as the trainer writes it: fp32 params in their own shapes under ``model.*`` (a
    tied head under both names), optimizer states beside them, train_state.json, manifest,
    checkpoint_latest. ``chunks > 1`` stores every tensor as a ShardedTensor of the boxes of
    uneven flat runs (what many ZeRO ranks produce)."""
    torch.manual_seed(seed)
    cfg = RunConfig(model=ModelConfig(**model_kw), train=TrainConfig(seq_len=model_kw["max_seq_len"]))
    model = lm.build(cfg.model)
    folder = root / "checkpoints" / layout.step_dir_name(step)
    folder.mkdir(parents=True)
    # Checkpoint names: each stacked expert matrix as one tensor per expert (parallel.engine.per_expert_*).
    named = per_expert_tensors(model, {k: p.detach().float() for k, p in model.named_parameters(remove_duplicate=False)})
    params = {"model." + k: v for k, v in named.items()}
    sd = dict(params)
    for k, v in per_expert_tensors(model, dict(model.named_parameters())).items():
        sd[f"optim.state.{k}.exp_avg"] = torch.randn(v.shape)
        sd[f"optim.state.{k}.step"] = torch.tensor(3.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process"
        if chunks > 1:
            _save_chunked(sd, folder, chunks)
        else:
            dcp.save(sd, checkpoint_id=str(folder), no_dist=True)
    state = {"format_version": FORMAT_VERSION, "step": step, "tokens": step * 64, "config": cfg.to_dict(),
             "tokenizer": {"type": "byte", "vocab_size": 257, "eos_id": 256},
             "metrics": {"last": {"step": step, "loss": 2.5}, "history": [{"step": s, "loss": 3.0 - s / 10}
                                                                         for s in range(1, step + 1)]},
             "topology": {"world_size": 4, "zero_stage": 2, "ep_size": 2, "optimizer": "adamw"}}
    (folder / layout.TRAIN_STATE).write_text(json.dumps(state, indent=1))
    write_manifest(folder, {"step": step})
    layout.point_latest(folder.parent, folder)
    return model.eval(), folder


def _save_chunked(sd: dict, folder: Path, chunks: int) -> None:
    import torch.distributed as dist
    from torch.distributed._shard.metadata import ShardMetadata
    from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor
    from torch.distributed._shard.sharded_tensor.metadata import ShardedTensorMetadata, TensorProperties

    dist.init_process_group("gloo", init_method=f"file://{folder.parent / 'pg'}", rank=0, world_size=1)
    try:
        out = {}
        for k, v in sd.items():
            if v.dim() > 0 and v.numel() >= chunks:
                cuts = sorted({0, v.numel(), *[(v.numel() * (i * i + 1)) // (chunks * chunks + 1)
                                               for i in range(1, chunks)]})
                flat = v.reshape(-1)
                shards = [Shard(box_view(flat, box, 0).clone(), ShardMetadata(list(box.offsets), list(box.sizes),
                                                                             "rank:0/cpu"))
                          for a, b in zip(cuts, cuts[1:]) for box in flat_boxes(tuple(v.shape), a, b - a)]
                md = ShardedTensorMetadata([s.metadata for s in shards], v.shape, TensorProperties(dtype=v.dtype))
                out[k] = ShardedTensor._init_from_local_shards_and_global_metadata(shards, md)
            else:
                out[k] = v
        dcp.save(out, checkpoint_id=str(folder))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    model, folder = make_checkpoint(root, TINY)
    return model, folder


def _run(argv, capsys) -> tuple[int, str]:
    rc = main(argv + ["-q"])
    return rc, capsys.readouterr().err


def _emb(model) -> str:
    """Name of the embedding the output head is tied to (the checkpoint stores it once)."""
    return next(n for n, p in model.named_parameters() if p is model.lm_head.weight)


def _tokens():
    return torch.randint(0, TINY["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(1))


def test_pt_round_trip_is_byte_identical_to_torch_save(ckpt, tmp_path, capsys, monkeypatch):
    model, folder = ckpt
    read = []
    orig = CheckpointReader.read_data

    def spy(self, plan, planner):
        read.extend(item.storage_index.fqn for item in plan.items)
        return orig(self, plan, planner)

    monkeypatch.setattr(CheckpointReader, "read_data", spy)
    out = tmp_path / "a" / "consolidated.pt"
    rc, err = _run([str(folder.parent / layout.LATEST), "-o", str(out), "--verify"], capsys)
    assert rc == 0, err
    assert "verified" in err and read and all(k.startswith("model.") for k in read)  # optimizer/RNG never read
    obj = torch.load(out, weights_only=True)
    ref_sd = model.state_dict()
    assert list(obj) == ["step", "model_state_dict", "config", "metrics", "tokenizer"]
    assert list(obj["model_state_dict"]) == list(ref_sd)
    for k, v in ref_sd.items():
        assert torch.equal(obj["model_state_dict"][k], v), k
    sd = obj["model_state_dict"]
    assert sd["lm_head.weight"].untyped_storage().data_ptr() == sd[_emb(model)].untyped_storage().data_ptr()
    assert obj["step"] == 7 and obj["metrics"]["last"]["loss"] == 2.5 and obj["tokenizer"]["type"] == "byte"
    assert RunConfig.from_dict(obj["config"]).model == ModelConfig(**TINY)
    # The streamed file is exactly what torch.save writes for the same dict with real tensors.
    state = json.loads((folder / layout.TRAIN_STATE).read_text())
    ref = {"step": state["step"], "model_state_dict": ref_sd, "config": state["config"],
           "metrics": state["metrics"], "tokenizer": state["tokenizer"]}
    (tmp_path / "b").mkdir()
    torch.save(ref, tmp_path / "b" / out.name)
    assert (tmp_path / "b" / out.name).read_bytes() == out.read_bytes()


def test_default_output_refuses_overwrite_and_twice_is_identical(ckpt, tmp_path, capsys):
    _, src = ckpt
    folder = tmp_path / "checkpoints" / src.name
    shutil.copytree(src, folder)
    rc, err = _run([str(folder)], capsys)
    out = folder.parent / "consolidated_step_7.pt"
    assert rc == 0 and out.is_file(), err
    first, mtime = out.read_bytes(), out.stat().st_mtime_ns
    rc, err = _run([str(folder)], capsys)
    assert rc == 2 and "already exists; pass --force" in err and len(err.strip().splitlines()) == 1
    assert out.stat().st_mtime_ns == mtime
    rc, err = _run([str(folder), "--force"], capsys)
    assert rc == 0 and out.read_bytes() == first and out.stat().st_mtime_ns != mtime
    assert [p.name for p in folder.parent.iterdir() if p.name.startswith(".")] == []  # no temp left
    for i in (1, 2):
        assert _run([str(folder), "--format", "safetensors", "--max-shard-size", "60KB", "-o",
                     str(tmp_path / f"st{i}")], capsys)[0] == 0
    names = sorted(p.name for p in (tmp_path / "st1").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "st2").iterdir()) and len(names) > 4
    for n in names:
        assert (tmp_path / "st1" / n).read_bytes() == (tmp_path / "st2" / n).read_bytes(), n


def test_logits_equal_from_every_format(ckpt, tmp_path, capsys):
    model, folder = ckpt
    tokens = _tokens()
    ref, _ = model(tokens, return_aux_loss=False)
    pt = tmp_path / "m.pt"
    assert _run([str(folder), "-o", str(pt)], capsys)[0] == 0
    for fmt_args, name in ((["--max-shard-size", "40KB"], "sharded"), ([], "single")):
        assert _run([str(folder), "--format", "safetensors", "-o", str(tmp_path / name)] + fmt_args, capsys)[0] == 0
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert (tmp_path / "single" / "model.safetensors").is_file()
    hf = json.loads((tmp_path / "single" / "config.json").read_text())
    assert hf["model_type"] == "moe_dist" and hf["hidden_size"] == 32 and hf["tie_word_embeddings"] is True
    sources = [folder, folder.parent / layout.LATEST, folder.parent.parent, pt, tmp_path / "sharded",
               tmp_path / "sharded" / "model.safetensors.index.json", tmp_path / "single" / "model.safetensors"]
    for src in sources:
        m, cfg, step = load_model_for_inference(src)
        assert step == 7 and cfg.model == model.cfg and not m.training
        got, _ = m(tokens, return_aux_loss=False)
        assert torch.equal(got, ref), src
        assert m.lm_head.weight is m.get_parameter(_emb(model))
    fresh = lm.build(model.cfg)
    step, config, metrics = load_checkpoint(folder, fresh)
    assert (step, config["model"]["d_model"], metrics["last"]["loss"]) == (7, 32, 2.5)
    assert torch.equal(fresh.eval()(tokens, return_aux_loss=False)[0], ref)
    other = lm.build(ModelConfig(**{**TINY, "num_experts": 2, "top_k": 1}))
    with pytest.raises(CheckpointError, match="does not match the checkpoint .*unexpected: layers.0.ffn.experts.2"):
        load_checkpoint(folder, other)


def test_bf16_and_fp16_outputs(ckpt, tmp_path, capsys):
    model, folder = ckpt
    for dtype, torch_dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        out = tmp_path / f"{dtype}.pt"
        rc, err = _run([str(folder), "-o", str(out), "--dtype", dtype, "--verify"], capsys)
        assert rc == 0 and "verified" in err, err
        sd = torch.load(out, weights_only=True)["model_state_dict"]
        for k, v in model.state_dict().items():
            assert sd[k].dtype == torch_dtype and torch.equal(sd[k], v.to(torch_dtype)), k
        assert zipfile.ZipFile(out).testzip() is None  # every patched CRC-32 is right
    assert out.stat().st_size < (tmp_path / "bf16.pt").stat().st_size * 1.01
    rc, err = _run([str(folder), "--format", "safetensors", "--dtype", "bf16", "--verify", "-o",
                    str(tmp_path / "st")], capsys)
    assert rc == 0 and "verified" in err, err
    m, _, _ = load_model_for_inference(tmp_path / "st")
    emb = _emb(model)
    assert torch.equal(m.get_parameter(emb), model.get_parameter(emb).to(torch.bfloat16).float())


def test_pt_without_crc32(ckpt, tmp_path, capsys):
    model, folder = ckpt
    torch.serialization.set_crc32_options(False)
    try:
        assert _run([str(folder), "-o", str(tmp_path / "n.pt"), "--verify"], capsys)[0] == 0
    finally:
        torch.serialization.set_crc32_options(True)
    sd = torch.load(tmp_path / "n.pt", weights_only=True)["model_state_dict"]
    assert all(torch.equal(sd[k], v) for k, v in model.state_dict().items())


def test_verify_catches_a_changed_weight(ckpt, tmp_path, capsys):
    _, folder = ckpt
    out = tmp_path / "v.pt"
    assert _run([str(folder), "-o", str(out)], capsys)[0] == 0
    with zipfile.ZipFile(out) as zf:
        info = max(zf.infolist(), key=lambda i: i.file_size)  # the biggest storage: the embedding
    flip_bits(out, info.header_offset + info.file_size // 2 + 100)
    with pytest.raises(ConsolidateError, match=r"verify: .* differs from model\."):
        verify_output(Checkpoint(folder), out, "pt", torch.float32, 1 << 20)


def test_chunked_checkpoint_is_assembled(tmp_path, capsys):
    model, folder = make_checkpoint(tmp_path, TINY, step=3, seed=5, chunks=3)
    md = CheckpointReader(folder).read_metadata().state_dict_metadata
    chunks = md["model.layers.0.ffn.experts.3.w_up.weight"].chunks
    # 3 uneven runs of a [48, 32] matrix, two cut mid-row: 5 boxes of the matrix's own shape
    assert len(chunks) == 5 and all(len(c.sizes) == 2 for c in chunks)
    out = tmp_path / "c.pt"
    assert _run([str(folder), "-o", str(out), "--verify", "--read-budget", "20KB"], capsys)[0] == 0
    sd = torch.load(out, weights_only=True)["model_state_dict"]
    assert all(torch.equal(sd[k], v) for k, v in model.state_dict().items())


def test_user_errors_are_one_line(ckpt, tmp_path, capsys):
    _, src = ckpt
    (tmp_path / "plain").mkdir()
    half = tmp_path / "half" / "checkpoint_step_7"
    shutil.copytree(src, half)
    (half / layout.MANIFEST).unlink()
    bad = tmp_path / "bad" / "checkpoint_step_7"
    shutil.copytree(src, bad)
    shard = next(bad.glob("*.distcp"))
    flip_bits(shard, mask=0xFF)
    cases = [
        ([str(tmp_path / "nope")], "no such file or folder"),
        ([str(tmp_path / "plain")], "not a checkpoint (no .metadata, manifest.json or checkpoints/ inside)"),
        ([str(half)], "incomplete checkpoint (missing manifest.json)"),
        ([str(bad), "-o", str(tmp_path / "x.pt")], "differs from the manifest"),
        ([str(src), "-o", str(src / "in.pt")], "inside the checkpoint"),
        ([str(src), "-o", str(tmp_path / "y.pt"), "--max-shard-size", "1MB"], "only applies to --format safetensors"),
        ([str(src), "-o", str(tmp_path / "y.pt"), "--read-budget", "lots"], "cannot read 'lots' as a size"),
    ]
    for argv, message in cases:
        rc, err = _run(argv, capsys)
        assert rc == 2 and message in err and len(err.strip().splitlines()) == 1, (argv, err)
        assert "Traceback" not in err
    # The flipped byte sits in tensor data: skipping the manifest check reads it without complaint.
    assert _run([str(bad), "-o", str(tmp_path / "z.pt"), "--no-verify-manifest"], capsys)[0] == 0
    help_text = build_parser().format_help()
    for flag in ("--dtype", "--format", "--max-shard-size", "--verify", "--no-verify-manifest", "--force"):
        assert flag in help_text


def test_pickled_code_is_never_run(ckpt, tmp_path, capsys):
    _, src = ckpt
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    evil_pt = tmp_path / "evil.pt"
    torch.save({"step": 1, "model_state_dict": {}, "config": {}, "payload": Evil()}, evil_pt)
    with pytest.raises(CheckpointError, match="refused: it pickles objects other than tensors"):
        load_model_for_inference(evil_pt)
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(evil_pt, lm.build(ModelConfig(**TINY)))
    assert generate_main([str(evil_pt), "--max-new-tokens", "2"]) == 2
    assert "refused" in capsys.readouterr().err
    # DCP's own .metadata is a pickle too: it goes through an allow-list unpickler.
    folder = tmp_path / "checkpoints" / src.name
    shutil.copytree(src, folder)
    import pickle

    (folder / layout.DCP_METADATA).write_bytes(pickle.dumps(Evil()))
    write_manifest(folder, {"step": 7})
    rc, err = _run([str(folder), "-o", str(tmp_path / "e.pt")], capsys)
    assert rc == 2 and "refusing to unpickle io.open" in err
    with pytest.raises(CheckpointError, match="refusing to unpickle"):
        load_model_for_inference(folder)
    assert not marker.exists()


def test_generate_cli_and_lazy_exports(ckpt, capsys):
    _, folder = ckpt
    argv = [str(folder), "--prompt", "Hi", "--max-new-tokens", "6", "--seed", "3"]
    assert generate_main(argv) == 0
    first = capsys.readouterr().out
    assert generate_main(argv) == 0
    assert capsys.readouterr().out == first and first.startswith("Hi")
    import moe_dist

    assert moe_dist.load_checkpoint is load_checkpoint and moe_dist.load_model_for_inference is load_model_for_inference


# ru_maxrss is a high-water mark that Linux carries across exec: a subprocess spawned by this big
# pytest process starts with pytest's peak. A child forked by the still-small measuring process
# starts clean, so it does the imports, takes the baseline, then the work.
_MEASURE = textwrap.dedent("""
    import os, resource, sys, time
    read_end, write_end = os.pipe()
    if os.fork() == 0:
        import torch, safetensors.torch, rich.progress
        import moe_dist.export.consolidate_cli, moe_dist.model
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t0 = time.perf_counter()
        if sys.argv[1] == "ours":
            assert moe_dist.export.consolidate_cli.main([sys.argv[2], "-o", sys.argv[3], "-q"]) == 0
        else:
            dcp_to_torch_save(sys.argv[2], sys.argv[3])
        dt = time.perf_counter() - t0
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        os.write(write_end, f"{(peak - base) * 1024} {dt}".encode())
        os._exit(0)
    _, status = os.wait()
    assert status == 0, status
    print(os.read(read_end, 100).decode())
""")




def test_peak_memory_stays_far_below_the_model(tmp_path):
    kw = dict(vocab_size=320, d_model=256, n_layers=4, n_heads=4, d_ff=1024, num_experts=16, top_k=2,
              max_seq_len=64)
    model, folder = make_checkpoint(tmp_path, kw, step=1)
    nbytes = sum(p.numel() * 4 for p in model.parameters())
    del model
    assert nbytes > 200e6
    script = tmp_path / "measure.py"
    script.write_text(_MEASURE)
    results = {}
    for which in ("ours", "dcp_to_torch_save"):
        out = tmp_path / f"{which}.pt"
        proc = subprocess.run([sys.executable, str(script), which, str(folder), str(out)], capture_output=True,
                              text=True, timeout=120, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        assert proc.returncode == 0, proc.stderr
        peak, seconds = proc.stdout.split()[-2:]
        results[which] = (int(peak), float(seconds))
    key = "layers.3.ffn.experts.15.w_down.weight"
    same = torch.load(tmp_path / "ours.pt", weights_only=True, mmap=True)["model_state_dict"][key]
    assert torch.equal(same, torch.load(tmp_path / "dcp_to_torch_save.pt", weights_only=True,
                                        mmap=True)["model." + key].view_as(same))
    print(f"\nconsolidating {nbytes / 1e6:.0f} MB of fp32 params "
          f"({_du(folder) / 1e6:.0f} MB checkpoint with optimizer states):")
    for which, (peak, seconds) in results.items():
        print(f"  {which:18s} peak RSS +{peak / 1e6:6.1f} MB ({peak / nbytes:5.1%} of the params), "
              f"{seconds:5.2f}s, {nbytes / seconds / 1e6:6.0f} MB/s of params")
    assert results["ours"][0] < 0.5 * nbytes


def _du(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir())
