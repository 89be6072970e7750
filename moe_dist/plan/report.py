"""What ``moe-plan`` prints: the per-device memory tables of one plan (``render``) and the tables of
``--choose`` (``print_choice``: the layouts tried) and ``--fit`` (``print_fit``: the largest models)."""

from __future__ import annotations

from typing import Any

from ..config import RunConfig
from .layout_search import MAX_D_MODEL_HEADS, MAX_LAYERS, Choice, FitResult
from .memory import Plan
from .units import fmt_bytes, fmt_count


def render(pl: Plan, preset: str, console: Any) -> None:
    from rich.table import Table

    s, pc = pl.settings, pl.params
    off = "+".join(x for x, on in (("optimizer", s.offload_optimizer), ("params", s.offload_params)) if on) or "none"
    console.print(f"[bold]{preset}[/]: {fmt_count(pc.total)} params ({fmt_count(pc.experts)} in routed experts) | "
                  f"{s.label}, offload {off}, {s.precision}, {s.optimizer}, world {s.world_size}, "
                  f"EP {s.ep_size}, micro {s.micro_batch} x seq {s.seq_len}, grad accum {s.grad_accum}, "
                  f"act. ckpt {'on' if s.activation_checkpointing else 'off'}")
    for rep in (pl.gpu, pl.cpu):
        if rep is None:
            continue
        t = Table(title=f"{rep.device} memory ({rep.scope})", title_justify="left")
        for col, just in (("consumer", "left"), ("phase", "left"), ("size", "right"), ("note", "left")):
            t.add_column(col, justify=just)
        for c in sorted(rep.consumers, key=lambda c: -c.bytes):
            t.add_row(c.name, c.phase, fmt_bytes(c.bytes), c.note)
        t.add_section()
        t.add_row("[bold]total (peak over phases)[/]", "", f"[bold]{fmt_bytes(rep.total)}[/]", "")
        t.add_row("capacity", "", fmt_bytes(rep.capacity), "")
        verdict = "[bold green]FITS[/]" if rep.fits else "[bold red]DOES NOT FIT[/]"
        t.add_row(verdict, "", "", f"biggest consumer: {rep.biggest.name} ({fmt_bytes(rep.biggest.bytes)})")
        console.print(t)
    for note in pl.notes:
        console.print(f"note: {note}")


def print_choice(ch: Choice, cfg: RunConfig, where: str, console: Any) -> None:
    from rich.table import Table

    t = Table(title=f"Layouts tried for {cfg.preset} on {where}, fastest first", title_justify="left")
    for col in ("layout", "GPU peak", "CPU peak", "fits"):
        t.add_column(col, justify="left" if col == "layout" else "right")
    for lay, pl in ch.tried:
        t.add_row(lay.label, fmt_bytes(pl.gpu.total if pl.gpu else None), fmt_bytes(pl.cpu.total),
                  "yes" if pl.fits else "no")
    console.print(t)
    if ch.layout is None:
        console.print("[bold red]no layout fits[/]; the last one tried in full below (--fit finds what does fit)")
        render(ch.tried[-1][1], cfg.preset, console)
        return
    console.print(f"[bold]chosen: {ch.layout.label}[/] (moe-train flags: {ch.layout.train_flags})")
    render(ch.plan, cfg.preset, console)


def print_fit(results: list[FitResult], cfg: RunConfig, where: str, console: Any) -> None:
    from rich.table import Table

    m = cfg.model
    t = Table(title=f"Largest {cfg.preset}-family model that fits {where}", title_justify="left")
    for col in ("experts", "d_model", "layers", "heads", "d_ff", "total params", "layout", "GPU peak", "CPU peak"):
        t.add_column(col, justify="left" if col == "layout" else "right")
    for r in results:
        pl, rm = r.choice.plan, r.cfg.model
        t.add_row(str(r.num_experts), str(r.d_model), str(r.n_layers), str(rm.n_heads), str(rm.d_ff),
                  fmt_count(r.params), r.choice.layout.label, fmt_bytes(pl.gpu.total if pl.gpu else None),
                  fmt_bytes(pl.cpu.total))
    console.print(t)
    console.print(f"scaled: d_model (multiples of head_dim {m.head_dim}) with n_layers at d_model/n_layers = "
                  f"{m.d_model / m.n_layers:.4g}, then layers added while they fit; d_ff = d_model x "
                  f"{m.d_ff / m.d_model:g} rounded to 64; num_experts. Kept: head_dim, top_k {m.top_k}, "
                  f"{m.expert_type} experts, vocab {m.vocab_size}, micro batch x seq, global batch, activation "
                  "checkpointing, optimizer.")
    if not results:
        console.print("[bold red]nothing fits[/]: not even one layer of d_model = head_dim")
        return
    top, tm = results[0], results[0].cfg.model
    if top.d_model == MAX_D_MODEL_HEADS * m.head_dim or top.n_layers == MAX_LAYERS:
        console.print(f"note: the search stopped at its limit (d_model {MAX_D_MODEL_HEADS * m.head_dim}, "
                      f"{MAX_LAYERS} layers); a bigger model may fit")
    model_flags = " ".join(f"--set model.{k}={getattr(tm, k)}" for k in
                           ("d_model", "n_heads", "n_kv_heads", "d_ff", "n_layers", "num_experts")
                           if getattr(tm, k) is not None)
    console.print(f"[bold]largest: {fmt_count(top.params)} params[/] (d_model {top.d_model}, {top.n_layers} "
                  f"layers, {top.num_experts} experts), {top.choice.layout.label}. Train it with: "
                  f"{model_flags} {top.choice.layout.train_flags}")
