"""``moe-plan``: will a run fit? Per-GPU and per-node CPU memory, consumer by consumer.

    moe-plan --preset 4090 --gpu-mem 24GB --cpu-mem 64GB
    moe-plan --preset 18b --gpus-per-node 8 --nodes 2 --gpu-mem 180GB --cpu-mem 2TB --zero-stage 2 --ep-size 8
    moe-plan --preset tiny --accelerator cpu --precision fp32 --zero-stage 2      # the CPU demo
    moe-plan --preset 18b --choose --gpu-mem 24GB --cpu-mem 128GB                  # the fastest layout that fits
    moe-plan --preset 4090 --fit --gpu-mem 24GB --cpu-mem 64GB                     # the largest model that fits

Everything is analytic: parameter counts come from ``ModelConfig`` (no model is built, torch is
not imported), the ZeRO stage / offload / buckets from the same DeepSpeed config the trainer
builds (``parallel.deepspeed_config.build_ds_config``: RunConfig and flags over the launch JSON).

Legend: P parameters (all), Pe routed-expert parameters, N world size, ep EP degree, S = P/N the
ZeRO partition a rank owns (expert params: Pe/ep local, over N/ep expert-data-parallel ranks, is
Pe/N too), lp bytes of the low-precision copy (bf16 2, fp32 4), LL the largest module's
parameters (what ZeRO-3 gathers at once), B micro batch, T seq len, d d_model, F d_ff, K top_k,
E experts, V vocab, c matrices per expert (swiglu 3, silu_mlp 2; hidden tensors 4 and 2).

Model states per rank (bytes), following what DeepSpeed 0.19 allocates:
  ZeRO-1/2  params lp*(Pne + Pe/ep); grads lp*S (ZeRO-2; ZeRO-1 keeps full lp grads) + fp32 grad
            partition 4*S built for the step; master 4*S; AdamW 8 B/param, Muon 4 B/param.
            Offload: grads 4*S, master, states on CPU; GPU keeps only the lp params. Muon with offload:
            DeepSpeed copies the fp32 Muon grads + momentum to the GPU for Newton-Schulz (ZeRO-3: 8 B/param
            of one sub_group + its lp copies, gathered to full on several ranks; ZeRO-2: 64 MiB batches).
  ZeRO-3    params lp*S (+ lp*LL gathered, + small persistent params); grads lp*LL in flight,
            lp*S partition buffer, fp32 grads 4*S (offload: on CPU) or one sub_group at the step.
  Init      the sharded build (``parallel.sharded_build``, the default) makes one module's parameters
            at a time in a reused fp32 staging buffer on the CPU (4*LL), then this rank's params in the
            lp dtype on their device (ZeRO-3: lp*S, partitioned at once; ZeRO-1/2: lp*(Pne + Pe/ep));
            with ``--full-build`` every rank builds the full fp32 model on CPU (4*P) before the engine
            shards it. Checked against measured RSS: ``tests/distributed/test_startup.py``.
Activations (per micro-batch, saved for backward; SDPA/flash attention, so no T^2 term):
  per token per block: lp*(6d + 2*kv*hd + 2*K*d*imb + K*h*F*imb [+ h*F shared]) + 4*nh + 8 + 8E + 12K
  (x, norm out, q, attn out, k, v, MoE-in, norm out; top_k dispatched copies and expert outputs;
  expert hidden tensors h = 4 swiglu / 2 silu_mlp; fp32 logsumexp, rstd, router logits/probs,
  top-k ids+weights). imb = 1 without EP, capacity_factor (or 1.25 dropless) with EP.
  no checkpointing: L blocks + one block of gradients; checkpointing: L*d*lp block inputs + one
  block recomputed + its gradients. LM head: B*T*(V*(12 + 2 if bf16) + 2d*lp): fp32 logits,
  log-softmax output and its gradient, the bf16 matmul output.
Totals are a peak over phases: always + max(init, train + max(fwd/bwd, step)) (see ``peak``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from ..config import ConfigError, ModelConfig, RunConfig, apply_overrides
from ..parallel.deepspeed.config import build_ds_config, optimizer_kind, read_launch_json
from ..parallel.dims import validate_ep
from .muon_cost import muon_step_note
from .param_counts import ParamCounts, count_params
from .units import GiB


# Stated constants (per GPU unless said otherwise).
CUDA_CONTEXT_BYTES = int(1.0 * GiB)   # CUDA context, kernel images (lazy loading), cuBLAS/cuDNN workspaces
NCCL_BYTES = int(0.5 * GiB)           # NCCL communicators and their channel buffers, when world > 1
GPU_FRAGMENTATION = 0.05              # caching-allocator fragmentation, as a share of the tensor peak
HOST_PROCESS_BYTES = {                # resident set of one idle training process
    "cuda": int(2.0 * GiB),           # Python, torch + CUDA libraries, DeepSpeed, Accelerate, data loading
    "cpu": int(0.5 * GiB),            # measured: imports 0.45 GiB (torch, DeepSpeed, Accelerate, transformers) + Muon kernel compile
}
DROPLESS_IMBALANCE = 1.25             # tokens a rank's experts may receive over the fair share under EP
# DeepSpeed's values when the launch JSON leaves a field out (deepspeed/runtime/zero/config.py).
DS_ZERO_DEFAULTS = {"reduce_bucket_size": 5e8, "allgather_bucket_size": 5e8, "stage3_prefetch_bucket_size": 5e7,
                    "sub_group_size": 1e9, "stage3_param_persistence_threshold": 1e5}
PHASES = ("always", "init", "train", "fwd/bwd", "step")
MODEL_STATE = ("params", "grads", "optimizer")


# --------------------------------------------------------------------------- inputs and outputs
@dataclass
class Hardware:
    """The machines: memory per GPU, memory per node, and how many of each."""

    gpu_mem: Optional[int] = 24 * GiB     # bytes per GPU (ignored for accelerator='cpu')
    cpu_mem: int = 64 * GiB               # bytes per node
    gpus_per_node: int = 1                # = processes per node
    nodes: int = 1
    accelerator: str = "cuda"             # 'cuda', or 'cpu' (the demo: every "GPU" tensor is in host RAM)
    host_buffer_factor: float = 1.5       # slack on host model states (DeepSpeed's additional_buffer_factor:
    #                                       pinned host buffers round up to a power of two)

    def __post_init__(self) -> None:
        if self.accelerator not in ("cuda", "cpu"):
            raise ConfigError(f"accelerator: expected 'cuda' or 'cpu', found {self.accelerator!r}")
        if self.gpus_per_node < 1 or self.nodes < 1:
            raise ConfigError(f"gpus_per_node and nodes: expected >= 1, found {self.gpus_per_node}, {self.nodes}")

    @property
    def world_size(self) -> int:
        return self.gpus_per_node * self.nodes


@dataclass
class Consumer:
    name: str
    bytes: int
    category: str   # params | grads | optimizer | activations | buffers | overhead
    phase: str      # always | init | train | fwd/bwd | step
    note: str = ""


def peak(rows: list[Consumer]) -> int:
    """always + max(init, train + max(fwd/bwd, step)).

    ``init`` is start-up (the model built on CPU), before any ``train`` tensor exists; ``train``
    rows live for the whole run; ``fwd/bwd`` (activations, gathered params) and ``step``
    (fp32 grads, optimizer workspace) never overlap. ``always``: fixed process overheads.
    """
    by = {p: sum(r.bytes for r in rows if r.phase == p) for p in PHASES}
    return by["always"] + max(by["init"], by["train"] + max(by["fwd/bwd"], by["step"]))


@dataclass
class DeviceReport:
    device: str                      # 'GPU' or 'CPU'
    scope: str                       # 'per GPU' or 'per node'
    capacity: Optional[int]
    consumers: list[Consumer] = field(default_factory=list)

    @property
    def total(self) -> int:
        return peak(self.consumers)

    @property
    def model_states(self) -> int:
        """Peak of parameters, gradients and optimizer states only (what DeepSpeed's estimators count)."""
        return peak([c for c in self.consumers if c.category in MODEL_STATE])

    @property
    def fits(self) -> bool:
        return self.capacity is None or self.total <= self.capacity

    @property
    def biggest(self) -> Consumer:
        return max(self.consumers, key=lambda c: c.bytes)

    def get(self, name_prefix: str) -> int:
        return sum(c.bytes for c in self.consumers if c.name.startswith(name_prefix))


@dataclass
class Settings:
    """What the planner resolved from preset, launch JSON and flags."""

    zero_stage: int
    offload_optimizer: bool
    offload_params: bool
    precision: str
    optimizer: str
    ep_size: int
    world_size: int
    micro_batch: int
    seq_len: int
    grad_accum: int
    activation_checkpointing: bool
    sharded_build: bool
    zero: dict
    engine: str = "deepspeed"

    @property
    def label(self) -> str:
        return "FSDP2 (sharded as ZeRO-3)" if self.engine == "fsdp2" else f"ZeRO-{self.zero_stage}"


@dataclass
class Plan:
    settings: Settings
    params: ParamCounts
    gpu: Optional[DeviceReport]
    cpu: DeviceReport
    notes: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return self.cpu.fits and (self.gpu is None or self.gpu.fits)


# --------------------------------------------------------------------------- the estimate
def resolve(cfg: RunConfig, hw: Hardware, launch: Optional[dict] = None) -> Settings:
    """Resolve the run the way the trainer does (build_ds_config), and check the parallel degrees."""
    n, ep = hw.world_size, cfg.parallel.ep_size
    engine = cfg.parallel.engine
    if engine == "fsdp2":
        # FSDP2 shards parameters, gradients and optimizer states over the data-parallel ranks (experts over
        # their dp ranks) and gathers one unit at a time: ZeRO-3's terms. Its CPUOffloadPolicy moves
        # parameters and optimizer states together. No launch JSON applies.
        off = bool(cfg.parallel.offload_optimizer or cfg.parallel.offload_params)
        cfg = apply_overrides(cfg, {"parallel.zero_stage": 3, "parallel.offload_optimizer": off,
                                    "parallel.offload_params": off})
        launch = None
    ds = build_ds_config(cfg, launch if launch is not None else read_launch_json(None), n, hw.accelerator == "cuda")
    z = ds["zero_optimization"]
    stage = int(z["stage"])
    validate_ep(cfg, n)  # the trainer's own check (parallel.dims)
    zero = {k: float(z.get(k, v)) for k, v in DS_ZERO_DEFAULTS.items()}
    zero["overlap_comm"] = bool(z.get("overlap_comm", stage == 3))
    return Settings(
        zero_stage=stage, offload_optimizer=z.get("offload_optimizer", {}).get("device", "none") != "none",
        offload_params=z.get("offload_param", {}).get("device", "none") != "none",
        precision="bf16" if ds["bf16"]["enabled"] else "fp32", optimizer=optimizer_kind(ds), ep_size=ep,
        world_size=n, micro_batch=ds["train_micro_batch_size_per_gpu"], seq_len=cfg.train.seq_len,
        grad_accum=ds["gradient_accumulation_steps"], activation_checkpointing=cfg.parallel.activation_checkpointing,
        sharded_build=cfg.parallel.sharded_build, zero=zero, engine=engine)


def activation_rows(m: ModelConfig, s: Settings, capacity_factor: Optional[float]) -> list[Consumer]:
    """Saved activations of one micro-batch (formula in the module docstring)."""
    lp, bt, d, k, f = (2 if s.precision == "bf16" else 4), s.micro_batch * s.seq_len, m.d_model, m.top_k, m.d_ff
    imb = 1.0 if s.ep_size == 1 else (capacity_factor or DROPLESS_IMBALANCE)
    hid = 4 if m.expert_type == "swiglu" else 2
    attn = lp * (4 * d + 2 * m.kv_heads * m.head_dim) + 4 * m.n_heads + 8          # x, xn, q, o, k, v; lse, rstd
    route = lp * (2 * d + 2 * k * d * imb) + 8 * m.num_experts + 12 * k              # MoE-in, xn; dispatch+combine
    expert = lp * (k * hid * f * imb + (hid * f if m.shared_expert else 0))         # expert hidden tensors
    block = attn + route + expert
    saved = 1 if s.activation_checkpointing else m.n_layers
    why = "one block recomputed" if s.activation_checkpointing else f"{m.n_layers} blocks"
    rows = [Consumer(f"activations: attention + norms ({why})", int(bt * attn * saved), "activations", "fwd/bwd",
                     "lp*(4d+2*kv*hd) per token, no T^2 (SDPA/flash)"),
            Consumer(f"activations: MoE routing buffers ({why})", int(bt * route * saved), "activations", "fwd/bwd",
                     f"top_k*T*d dispatched + combined, imbalance {imb:g}"),
            Consumer(f"activations: expert hidden ({why})", int(bt * expert * saved), "activations", "fwd/bwd",
                     f"top_k*T*{hid}*d_ff")]
    if m.dropout > 0:  # masks kept for backward: bool on both residual branches, the experts' in lp (flash SDPA: none)
        masks = bt * (2 * d + lp * k * f * imb) * saved + 2 * bt * d
        rows.append(Consumer(f"activations: dropout masks ({why})", int(masks), "activations", "fwd/bwd",
                             "2d bool + top_k*d_ff per token and block; embedding, head"))
    if s.activation_checkpointing:
        rows.append(Consumer("activations: checkpointed block inputs", bt * lp * d * m.n_layers, "activations",
                             "fwd/bwd", "L*T*d"))
    rows.append(Consumer("activation gradients (one block in backward)", int(bt * block), "activations", "fwd/bwd"))
    rows.append(Consumer("LM head: logits + loss (fp32)", bt * (m.vocab_size * (12 + (2 if lp == 2 else 0)) + 2 * d * lp),
                         "activations", "fwd/bwd", "B*T*V fp32 logits, log-softmax and its grad"))
    return rows


def plan(cfg: RunConfig, hw: Hardware, launch: Optional[dict] = None) -> Plan:
    """Estimate per-GPU and per-node CPU memory of training ``cfg`` on ``hw``.

    ``launch`` is the DeepSpeed launch JSON (None: the trainer's default). Start-up follows
    ``cfg.parallel.sharded_build`` (module docstring, "Init").
    """
    s = resolve(cfg, hw, launch)
    pc = count_params(cfg.model)
    n, ep, stage = s.world_size, s.ep_size, s.zero_stage
    lp = 2 if s.precision == "bf16" else 4
    P, Pe, Pne = pc.total, pc.experts, pc.non_expert
    local = Pne + Pe / ep                        # params a rank holds under ZeRO-1/2
    S = P / n                                    # the partition a rank owns (ZeRO-1/2 states, ZeRO-3 all)
    ll = pc.largest_module
    mu_ne, mu_e = pc.muon(s.optimizer)
    S_muon = (mu_ne + mu_e) / n
    opt_dev = "cpu" if s.offload_optimizer else "gpu"
    par_dev = "cpu" if s.offload_params else "gpu"
    rows: dict[str, list[Consumer]] = {"gpu": [], "cpu": []}
    notes: list[str] = []

    def add(dev: str, name: str, nbytes: float, cat: str, phase: str = "train", note: str = "") -> None:
        if nbytes > 0:
            rows[dev].append(Consumer(name, int(nbytes), cat, phase, note))

    lpn = s.precision
    # parameters
    if stage < 3:
        add("gpu", f"parameters ({lpn} working copy)", lp * local, "params",
            note=f"experts / ep {ep}" if ep > 1 else "replicated")
    else:
        add(par_dev, f"parameters ({lpn}, ZeRO-3 partition)", lp * S, "params", note=f"P/{n}")
        add("gpu", "parameters gathered (ZeRO-3, largest module)", lp * ll, "params", "fwd/bwd", f"{ll / 1e6:.0f}M params")
        thr = s.zero["stage3_param_persistence_threshold"]
        add("gpu", "parameters persistent (ZeRO-3, small)", lp * pc.persistent(thr), "params",
            note=f"tensors under {thr:.0e} elements, kept whole")
    if s.sharded_build:
        add("cpu", "start-up: fp32 staging buffer", 4 * ll, "params", "init",
            f"sharded build: one module at a time, {ll / 1e6:.0f}M params")
        built = lp * (S if stage == 3 else local)
        add(par_dev if stage == 3 else "gpu", f"start-up: parameters made ({lpn})", built, "params", "init",
            f"P/{n}, partitioned as made" if stage == 3 else (f"experts / ep {ep}" if ep > 1 else "replicated"))
    else:
        add("cpu", "start-up: full fp32 model", 4 * P, "params", "init", "--full-build: the full model, "
            "before EP/ZeRO sharding")
    # gradients
    if stage < 3:
        if stage == 1 or not s.offload_optimizer:
            full = stage == 1
            add("gpu", f"gradients ({lpn}{'' if full else ', partition'})", lp * (local if full else S), "grads")
        if s.offload_optimizer:
            add("cpu", "gradients (fp32 partition, offloaded)", 4 * S, "grads")
            if s.grad_accum > 1:
                add("cpu", f"gradients ({lpn} accumulation buffer, offload)", lp * local, "grads",
                    note=f"grad_accum {s.grad_accum}")
        else:
            add("gpu", "gradients (fp32 partition for the step)", 4 * S, "grads", "step")
    else:
        add("gpu", f"gradients ({lpn}, gathered module in flight)", lp * ll, "grads", "fwd/bwd")
        add(opt_dev, f"gradients ({lpn} partition buffer)", lp * S, "grads", note="ZeRO-3 grad_partitions_flat_buffer")
        if s.offload_optimizer:
            add("cpu", "gradients (fp32 partition, offloaded)", 4 * S, "grads")
        else:
            sub = min(s.zero["sub_group_size"], S)
            add("gpu", "gradients (fp32, one sub_group at the step)", 4 * sub, "grads", "step",
                f"sub_group_size {s.zero['sub_group_size']:.0e}")
    # master weights and optimizer states
    add(opt_dev, "master weights (fp32 partition)", 4 * S, "optimizer", note=f"P/{n}")
    opt_name = "AdamW m,v" if s.optimizer == "adamw" else "Muon momentum + AdamW m,v"
    add(opt_dev, f"optimizer states ({opt_name}, fp32)", 8 * (S - S_muon) + 4 * S_muon, "optimizer",
        note=f"Muon {S_muon * n / P:.0%} of params" if s.optimizer == "muon" else "")
    if s.optimizer == "muon":  # on the largest Muon matrix: fp32 update + 2 bf16 iterates, two k x k products
        m = cfg.model
        r, c = max([(m.d_model, m.d_model), (m.d_model, m.d_ff), (m.num_experts, m.d_model)], key=lambda x: x[0] * x[1])
        # on the accelerator even with offload: DeepSpeed copies the Muon gradients there (muon_cost.py)
        add("gpu", "Muon Newton-Schulz workspace", 8 * r * c + 4 * min(r, c) ** 2, "optimizer", "step",
            f"largest matrix {r}x{c}")
        if s.offload_optimizer and hw.accelerator == "cuda":
            muon_offload_rows(add, s, r * c, S_muon)
    # activations
    for r in activation_rows(cfg.model, s, cfg.parallel.capacity_factor):
        rows["gpu"].append(r)
    # communication buffers
    rb, ab = s.zero["reduce_bucket_size"], s.zero["allgather_bucket_size"]
    if hw.accelerator == "cpu":  # host pages of torch.empty are resident only once written
        rb, ab = min(rb, local), min(ab, local)
    if stage < 3:
        k = 2 if s.zero["overlap_comm"] else 1
        add("gpu", "ZeRO reduce bucket", k * lp * rb, "buffers", note=f"{k} x {rb:.0e} elements")
        if s.offload_optimizer:
            add("gpu", "ZeRO offload gradient staging", lp * rb, "buffers", note=f"{rb:.0e} elements")
        if n > 1:
            add("gpu", "ZeRO all-gather bucket (updated params)", lp * ab, "buffers", "step", f"{ab:.0e} elements")
    else:
        add("gpu", "ZeRO-3 reduce bucket", lp * rb, "buffers", note=f"{rb:.0e} elements")
        pf = s.zero["stage3_prefetch_bucket_size"]
        add("gpu", "ZeRO-3 prefetch bucket", lp * pf, "buffers", "fwd/bwd", f"{pf:.0e} elements")
    if ep > 1:
        imb = cfg.parallel.capacity_factor or DROPLESS_IMBALANCE
        bt = s.micro_batch * s.seq_len
        add("gpu", "EP all-to-all buffers", 2 * lp * cfg.model.top_k * bt * cfg.model.d_model * imb, "buffers",
            "fwd/bwd", "send + receive, top_k*T*d")
    # fixed overheads
    add("cpu", "process baseline (Python, torch, DeepSpeed)", HOST_PROCESS_BYTES[hw.accelerator], "overhead",
        "always")
    if hw.accelerator == "cuda":
        add("gpu", "CUDA context + library workspaces", CUDA_CONTEXT_BYTES, "overhead", "always", "stated constant")
        if n > 1:
            add("gpu", "NCCL communicators", NCCL_BYTES, "overhead", "always", "stated constant")
        frag = GPU_FRAGMENTATION * peak([c for c in rows["gpu"] if c.category != "overhead"])
        add("gpu", "allocator fragmentation", frag, "overhead", "always", f"{GPU_FRAGMENTATION:.0%} of tensors")

    # per GPU -> per node
    per_node = hw.gpus_per_node
    host_rows = rows["cpu"] + (rows["gpu"] if hw.accelerator == "cpu" else [])
    factor = hw.host_buffer_factor if hw.accelerator == "cuda" else 1.0
    cpu = DeviceReport("CPU", "per node", hw.cpu_mem)
    for r in host_rows:
        f = factor if r.category in MODEL_STATE else 1.0
        note = [r.note] + ([f"x{f:g} host slack"] if f != 1.0 else []) + ([f"x{per_node} ranks"] if per_node > 1 else [])
        cpu.consumers.append(Consumer(r.name, int(r.bytes * f * per_node), r.category, r.phase,
                                      "; ".join(x for x in note if x)))
    gpu = DeviceReport("GPU", "per GPU", hw.gpu_mem, rows["gpu"]) if hw.accelerator == "cuda" else None

    if s.optimizer == "muon" and s.offload_optimizer:
        notes.append(muon_step_note(cfg.model, s.ep_size, hw.accelerator))
    if cfg.train.optimizer == "muon" and s.optimizer == "adamw":
        notes.append("ZeRO-3 with reduce_scatter: the trainer falls back to AdamW for all parameters (planned so).")
    if cpu.biggest.phase == "init" and cpu.biggest.bytes > cpu.total / 2:
        notes.append(f"CPU peak is start-up on each of the {per_node} local rank(s)"
                     + ("" if s.sharded_build else ": the full fp32 model built before sharding; the sharded build "
                        "(the trainer's default, without --full-build) removes it") + ".")
    return Plan(s, pc, gpu, cpu, notes)


def muon_offload_rows(add: Any, s: Settings, largest: int, S_muon: float) -> None:
    """GPU copies of the Muon gradients and momentum that DeepSpeed's offloaded Muon step makes
    (``_apply_muon_updates_cpu_offload``: fp32 grad + momentum to ``get_accelerator().current_device_name()``)."""
    n, lp = s.world_size, (2 if s.precision == "bf16" else 4)
    if s.zero_stage == 3:
        # stage3.py, per sub_group: its Muon grad and momentum partitions copied to the GPU in fp32 (8 B),
        # then _partitioned_buffers_all_gather in the gradient-accumulation dtype (= the lp dtype): one
        # world: a converted copy unless already fp32; several: local + gather + rearrange buffers.
        part = min(S_muon, s.zero["sub_group_size"])
        comm = (0 if lp == 4 else 2 * lp * part) if n == 1 else 2 * lp * part * (1 + 2 * n)
        add("gpu", "Muon grads + momentum copied to GPU (offload step)", 8 * part + comm, "optimizer", "step",
            f"fp32 + {s.precision} copies of one sub_group's Muon params" + ("; gathered to full" if n > 1 else ""))
    else:                   # stage_1_and_2.py: batches of <= 64 MiB (a larger matrix alone), 256 MiB gather cache
        add("gpu", "Muon grads + momentum copied to GPU (offload step)",
            max(64 * 2**20, 8 * largest) + (256 * 2**20 if n > 1 else 0), "optimizer", "step",
            "fp32, 64 MiB batches (_muon_allgather_max_buffer_bytes)")
