"""Section 4: loading a world-2 checkpoint into world 1 and 3 (resharded) vs into world 2.

For each load world size, one launch of ``benchmarks.ckpt_worker --mode load`` builds a fresh,
untrained engine the way ``train.py`` does and loads the same world-2 ``CheckpointManager``
checkpoint several times (after a first, untimed-for-the-median load that also materialises the
fresh optimizer's states; it is reported apart). DCP reshards the ZeRO fragments to whatever the
loading ranks own. The launches rotate over the world sizes for ``rounds`` rounds.
"""

from __future__ import annotations

from .bench_checkpoint import _worker, ensure_checkpoint
from .common import Context, Section, fmt, median, new_figure, ratio, spread

TITLE = "4. Resharded load: a world-2 checkpoint loaded on 1, 2 and 3 ranks"
WORLDS = [1, 2, 3]


def run(ctx: Context) -> Section:
    sec = Section(TITLE)
    sizes = ["14m"] if ctx.quick else ["tiny", "100m"]  # quick: section 3 leaves a 14m checkpoint
    reps, rounds = (3, 1) if ctx.quick else (7, 2)
    res: dict[tuple[str, int], dict[str, list[float]]] = {}
    for size in sizes:
        ckpt = ensure_checkpoint(ctx, size)
        for r in range(rounds):
            order = WORLDS[r % len(WORLDS):] + WORLDS[:r % len(WORLDS)]
            for world in order:
                print(f"  {size}: load on {world} rank(s), round {r + 1}/{rounds}", flush=True)
                out = _worker(ctx, size, "load", world, reps, "--ckpt", str(ckpt))["load"]
                acc = res.setdefault((size, world), {"load": [], "load + checksum check": [], "first": []})
                acc["load"] += out["runs"]["load"]
                acc["load + checksum check"] += out["runs"]["load + checksum check"]
                acc["first"].append(out["first_load"])
    sec.data = {f"{s}/w{w}": v for (s, w), v in res.items()}
    rows = []
    for size in sizes:
        base = median(res[(size, 2)]["load"])
        for world in WORLDS:
            r = res[(size, world)]
            rows.append([size, world, "no (same world)" if world == 2 else "yes", fmt(median(r["load"])),
                         spread(r["load"]), fmt(median(r["load + checksum check"])), fmt(median(r["first"])),
                         ratio(median(r["load"]), base)])
    sec.table(["size", "load world", "resharded", "load s (median)", "load s range", "load + checksum check s",
               "first load s", "load time / world-2 load"], rows,
              caption=f"CheckpointManager.load of the same world-2 checkpoint; {reps} loads per launch x {rounds} "
                      "round(s), launches rotated over the world sizes")
    sec.note("'load' = CheckpointManager.load without the manifest check, i.e. reading the DCP "
             "shards into this rank's ZeRO fragments (zero_load_template + dcp.load + load_zero_state_dict); the "
             "checksum check of every file (rank 0) is the same work on any world size. 'first load' also allocates "
             "the fresh optimizer's states. Ranks share the machine's 2 cores, so world 3 is oversubscribed.")
    fig, ax = new_figure()
    for size in sizes:
        ax.plot(WORLDS, [median(res[(size, w)]["load"]) for w in WORLDS], marker="o", label=size)
    ax.set_xticks(WORLDS)
    ax.set_xlabel("ranks loading the world-2 checkpoint")
    ax.set_ylabel("load time (s, median)")
    ax.set_ylim(bottom=0)
    ax.set_title("resharded load time")
    ax.grid(alpha=0.3)
    ax.legend()
    sec.plot(fig, ctx.out, "reshard_load.png", "resharded load time")
    return sec
