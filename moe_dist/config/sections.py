"""Dataclass configs: the one source of truth for every run.

A run is described by :class:`RunConfig`, made of five sections (model, parallel,
train, data, checkpoint). Presets (``tiny``, ``4090``, ``b200``, ``18b``: ``config/presets.py``)
build a ``RunConfig``; the CLI then applies overrides from a YAML/JSON file and from
``--set section.field=value`` (a bare ``field=value`` works when the name is unique).

Every field carries its help text in ``metadata["help"]`` so that ``--help`` and
the docs cannot drift from the code. Validation happens in ``__post_init__`` and
raises :class:`ConfigError` naming the field, the expected and the found value.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any, Optional


class ConfigError(ValueError):
    """A user-facing configuration problem; the message names the field and what to do."""


def _f(default: Any, help: str, **kw: Any) -> Any:  # noqa: A002 - mirrors argparse wording
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


def _require(cond: bool, section: str, name: str, expected: str, found: Any) -> None:
    if not cond:
        raise ConfigError(f"{section}.{name}: expected {expected}, found {found!r}")


@dataclass
class ModelConfig:
    """Architecture of the decoder-only MoE LM. Changing any of these makes a new model:
    a checkpoint only resumes into a model whose ModelConfig is equal."""

    vocab_size: int = _f(320, "Vocabulary size (embedding rows); must be >= the tokenizer's vocabulary.")
    d_model: int = _f(128, "Hidden size.")
    n_layers: int = _f(2, "Number of transformer blocks (each has an MoE feed-forward).")
    n_heads: int = _f(4, "Attention query heads; d_model must be divisible by it.")
    n_kv_heads: Optional[int] = _f(None, "Key/value heads for grouped-query attention (None = n_heads).")
    d_ff: int = _f(256, "Hidden size of each expert.")
    num_experts: int = _f(8, "Experts per MoE layer (global count, before expert parallelism).")
    top_k: int = _f(2, "Experts each token is routed to.")
    expert_type: str = _f(
        "swiglu",
        "'swiglu' (gate, up, down matrices) or 'silu_mlp' (the seed's two-matrix SiLU MLP).",
    )
    shared_expert: bool = _f(False, "Add one always-on dense expert of size d_ff beside the routed ones.")
    load_balancing_weight: float = _f(0.01, "Weight of the Switch-style load-balancing loss.")
    router_noise_std: float = _f(0.1, "Std of Gaussian noise added to router logits in training (seed: 0.1).")
    max_seq_len: int = _f(128, "Longest sequence the rotary tables cover.")
    rope_theta: float = _f(10000.0, "Rotary embedding base.")
    norm_eps: float = _f(1e-5, "RMSNorm epsilon.")
    tie_embeddings: bool = _f(True, "Share the input embedding with the output projection.")
    init_std: float = _f(0.02, "Std of the normal initialisation of weight matrices.")
    scaled_residual_init: bool = _f(True, "wo and w_down start from N(0, init_std / sqrt(2 * n_layers)) (GPT-2); "
                                          "False: every matrix N(0, init_std), the seed's.")
    embed_scale: bool = _f(False, "Multiply the embedding output by sqrt(d_model) (the seed's model).")
    dropout: float = _f(0.0, "Training dropout at the seed's six places: embedding, attention probabilities, both "
                             "residual branches, inside each expert (before w_down), before the head. Same masks on "
                             "any world size / EP degree and under activation checkpointing (model/dropout.py).")
    fused_qkv: bool = _f(False, "One attention projection wqkv (rows [Q | K | V]) instead of wq, wk, wv, so Muon "
                                "orthogonalises the one fused matrix as the seed does.")
    rope_layout: str = _f("half", "'half': rotary pairs (i, i + head_dim/2), fp64 tables; 'interleaved': pairs "
                                  "(2i, 2i+1), fp32 tables (torchtune's RotaryPositionalEmbeddings, the seed's).")
    aux_loss_reduction: str = _f("mean", "How the per-layer load-balancing losses combine: 'mean' over layers, or "
                                         "'sum' (the seed).")

    def __post_init__(self) -> None:
        s = "model"
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "num_experts", "top_k", "max_seq_len"):
            _require(int(getattr(self, name)) > 0, s, name, "a positive integer", getattr(self, name))
        _require(self.d_model % self.n_heads == 0, s, "d_model", f"a multiple of n_heads ({self.n_heads})", self.d_model)
        _require((self.d_model // self.n_heads) % 2 == 0, s, "d_model", "a head size that is even (rotary)", self.d_model)
        kv = self.kv_heads
        _require(self.n_heads % kv == 0, s, "n_kv_heads", f"a divisor of n_heads ({self.n_heads})", self.n_kv_heads)
        _require(self.top_k <= self.num_experts, s, "top_k", f"<= num_experts ({self.num_experts})", self.top_k)
        for name, choices in (("expert_type", ("swiglu", "silu_mlp")), ("rope_layout", ("half", "interleaved")),
                              ("aux_loss_reduction", ("mean", "sum"))):
            _require(getattr(self, name) in choices, s, name, " or ".join(map(repr, choices)), getattr(self, name))
        _require(self.load_balancing_weight >= 0, s, "load_balancing_weight", ">= 0", self.load_balancing_weight)
        _require(self.router_noise_std >= 0, s, "router_noise_std", ">= 0", self.router_noise_std)
        _require(0.0 <= self.dropout < 1.0, s, "dropout", "a rate in [0, 1)", self.dropout)
        _require(self.norm_eps > 0, s, "norm_eps", "> 0", self.norm_eps)

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


@dataclass
class ParallelConfig:
    """How the model is spread over processes. None of these change the model's maths
    (up to float reordering), so a checkpoint may be resumed under other values."""

    engine: str = _f("deepspeed", "Training engine: 'deepspeed' (ZeRO 1-3 through Accelerate, ZeRO-Offload, DeepSpeed's "
                                  "optimizers) or 'fsdp2' (PyTorch fully_shard per block and per expert, on a dp x ep "
                                  "mesh). Checkpoints of either resume under the other.")
    zero_stage: Optional[int] = _f(None, "DeepSpeed ZeRO stage 1, 2 or 3 (None = the launch config's JSON); "
                                         "not used by --engine fsdp2, which shards like ZeRO-3.")
    ep_size: int = _f(1, "Expert-parallel degree: ranks that split one layer's experts. Divides world size and num_experts.")
    offload_optimizer: Optional[bool] = _f(None, "Offload optimizer states to CPU (None = launch config). Under "
                                                 "--engine fsdp2 either offload flag selects FSDP2's CPUOffloadPolicy "
                                                 "(parameters, gradients and optimizer states on the host).")
    offload_params: Optional[bool] = _f(None, "Offload parameters to CPU, ZeRO-3 or --engine fsdp2 only "
                                              "(None = launch config).")
    capacity_factor: Optional[float] = _f(
        None, "Expert capacity as a multiple of the fair share of tokens; overflow is dropped. None = dropless."
    )
    activation_checkpointing: bool = _f(False, "Recompute each block's activations in backward to save memory.")
    precision: str = _f("auto", "'auto' (bf16 on GPU, fp32 on CPU), 'fp32' or 'bf16'.")
    sharded_build: bool = _f(
        True, "Build only this rank's part of the model at start-up (meta device, then each module's parameters "
              "in the training dtype, partitioned at once under ZeRO-3). False: every rank builds the full fp32 "
              "model on the CPU first (more host memory; kept to measure against).")
    expert_kernel: str = _f("auto", "How experts compute: 'grouped' (torch._grouped_mm over the stacked experts, no "
                                    "host sync), 'loop' (one matmul chain per expert) or 'auto' (grouped where it runs "
                                    "on the device and dtype, else loop; the choice is logged at start).")
    init_timeout_s: float = _f(600.0, "Collective timeout (s) of every process group until the first optimizer step "
                                      "is done: long enough for op builds and a sharded start-up.")
    train_timeout_s: float = _f(300.0, "The progress watchdog's limit after the first step: a rank stalled this long "
                                       "dumps its stacks to <output-dir>/hang-<rank>.txt and the run exits 76 (hung); "
                                       "every process group's collectives give up at 1.5x it, as a backstop.")
    compile: bool = _f(False, "torch.compile each transformer block (regional compilation; the first steps "
                              "pay the compile time).")

    def __post_init__(self) -> None:
        s = "parallel"
        _require(self.expert_kernel in ("auto", "grouped", "loop"), s, "expert_kernel", "'auto', 'grouped' or 'loop'",
                 self.expert_kernel)
        _require(self.engine in ("deepspeed", "fsdp2"), s, "engine", "'deepspeed' or 'fsdp2'", self.engine)
        _require(self.zero_stage in (None, 0, 1, 2, 3), s, "zero_stage", "0, 1, 2 or 3", self.zero_stage)
        _require(int(self.ep_size) >= 1, s, "ep_size", "a positive integer", self.ep_size)
        _require(self.capacity_factor is None or self.capacity_factor > 0, s, "capacity_factor", "> 0 or None", self.capacity_factor)
        _require(self.init_timeout_s > 0 and self.train_timeout_s > 0, s, "init_timeout_s/train_timeout_s", "> 0",
                 (self.init_timeout_s, self.train_timeout_s))
        _require(self.precision in ("auto", "fp32", "bf16"), s, "precision", "'auto', 'fp32' or 'bf16'", self.precision)

    def resolved_precision(self, on_gpu: bool) -> str:
        """'fp32' or 'bf16': what ``precision`` means on this machine (the rule every engine follows)."""
        if self.precision == "auto":
            return "bf16" if on_gpu else "fp32"
        return self.precision


@dataclass
class TrainConfig:
    """Optimisation. Learning rates, max_steps and clipping may change on resume;
    the global batch should not (it changes what a step means)."""

    global_batch_size: int = _f(
        12, "Sequences per optimizer step, whatever the world size (micro_batch x grad_accum x data-parallel size)."
    )
    micro_batch_size: int = _f(1, "Sequences per rank per forward pass; grad accumulation is derived.")
    seq_len: int = _f(128, "Tokens per training sequence (<= model.max_seq_len).")
    max_steps: int = _f(200, "Optimizer steps to train for (absolute: a resumed run stops at this step).")
    warmup_steps: int = _f(10, "Linear LR warmup, in optimizer steps (not micro-batches).")
    warmup_from_zero: bool = _f(False, "Warmup factor step / warmup_steps (the seed's), not (step + 1) / warmup_steps.")
    min_lr_ratio: float = _f(0.1, "Cosine decay floor as a fraction of the peak LR.")
    muon_lr: float = _f(0.02, "Peak LR of Muon (2-D hidden matrices, router).")
    adamw_lr: float = _f(3e-3, "Peak LR of AdamW (embeddings, norms, biases).")
    weight_decay: float = _f(0.1, "Decoupled weight decay of both optimizers.")
    weight_decay_on: str = _f("matrices", "What decays: 'matrices' (every 2-D parameter, norm gains not) or "
                                          "'adamw' (AdamW's: embedding and norms; Muon's not: the seed's split).")
    adam_betas: tuple = _f((0.9, 0.95), "AdamW betas.")
    muon_momentum: float = _f(0.95, "Muon momentum.")
    grad_clip: Optional[float] = _f(
        None, "Clip the global gradient norm to this (0 = off; None = 1.0 with AdamW, off with Muon, whose "
              "updates are normalised already).")
    optimizer: str = _f("muon", "'muon' (Muon + AdamW) or 'adamw' (AdamW for everything).")
    eval_every: int = _f(50, "Validate every N optimizer steps (0 = never).")
    eval_batches: Optional[int] = _f(
        16, "Validation batches of micro_batch_size sequences in one pass, over all ranks together: a fixed "
            "global sample, so val_loss is the same on any world size (None = the whole validation split).")
    log_every: int = _f(1, "Print a log line every N steps (metrics.jsonl gets every step).")
    seed: int = _f(1234, "Seed of weights, data order and router noise.")
    max_nonfinite_steps: int = _f(3, "Stop (exit code 3, diverged) after this many optimizer steps in a row whose loss or "
                                     "gradient norm is not finite; each such step is skipped (no update).")
    loss_spike_factor: float = _f(10.0, "Warn when a step's loss exceeds this multiple of the running mean (0 = off).")
    report_to: list = _f([], "Trackers that also get the metrics, through Accelerate: 'tensorboard' "
                             "(<output-dir>/tensorboard), 'wandb' (offline, <output-dir>/wandb); comma-separated.")

    def __post_init__(self) -> None:
        s = "train"
        for name in ("global_batch_size", "micro_batch_size", "seq_len", "max_steps", "log_every"):
            _require(int(getattr(self, name)) > 0, s, name, "a positive integer", getattr(self, name))
        _require(self.warmup_steps >= 0, s, "warmup_steps", ">= 0", self.warmup_steps)
        _require(0.0 <= self.min_lr_ratio <= 1.0, s, "min_lr_ratio", "between 0 and 1", self.min_lr_ratio)
        _require(self.optimizer in ("muon", "adamw"), s, "optimizer", "'muon' or 'adamw'", self.optimizer)
        _require(self.weight_decay_on in ("matrices", "adamw"), s, "weight_decay_on", "'matrices' or 'adamw'",
                 self.weight_decay_on)
        _require(self.muon_lr > 0 and self.adamw_lr > 0, s, "muon_lr/adamw_lr", "> 0", (self.muon_lr, self.adamw_lr))
        _require(self.grad_clip is None or self.grad_clip >= 0, s, "grad_clip", ">= 0 or None", self.grad_clip)
        _require(self.eval_batches is None or self.eval_batches > 0, s, "eval_batches", "> 0 or None",
                 self.eval_batches)
        _require(self.eval_every >= 0, s, "eval_every", ">= 0", self.eval_every)
        _require(self.max_nonfinite_steps >= 1, s, "max_nonfinite_steps", ">= 1", self.max_nonfinite_steps)
        _require(self.loss_spike_factor >= 0, s, "loss_spike_factor", ">= 0", self.loss_spike_factor)
        self.adam_betas = tuple(float(b) for b in self.adam_betas)
        if isinstance(self.report_to, str):
            self.report_to = [p.strip() for p in self.report_to.split(",") if p.strip()]
        for name in self.report_to:
            _require(name in ("tensorboard", "wandb", "none"), s, "report_to", "'tensorboard', 'wandb' or 'none'", name)

    def clip_norm(self) -> float:
        """The gradient-norm clip ``grad_clip`` asks for (its help: None = 1.0 with AdamW, off with Muon)."""
        if self.grad_clip is None:
            return 0.0 if self.optimizer == "muon" else 1.0
        return float(self.grad_clip)


@dataclass
class DataConfig:
    """Where text comes from and how it is tokenized."""

    data_files: list = _f([], "Local .txt/.json/.jsonl/.parquet files; empty = the built-in offline corpus.")
    dataset: Optional[str] = _f(None, "A Hugging Face hub dataset name (needs a network) or a local dataset folder, "
                                      "streamed into the token store, instead of data_files.")
    dataset_split: str = _f("train", "Split of the hub dataset to read.")
    text_field: str = _f("text", "Column holding the text in JSON/parquet/hub data.")
    tokenizer: str = _f("byte", "'byte' (no download) or a local Hugging Face tokenizer directory.")
    val_fraction: float = _f(0.05, "Fraction of packed blocks held out for validation (disjoint from train).")
    max_corpus_bytes: int = _f(4_000_000, "Cap on bytes read from the built-in corpus (keeps the demo fast).")
    store: Optional[str] = _f(None, "A token store folder written by moe-prepare-data to train on, instead of "
                                    "data_files / dataset / the built-in corpus.")
    store_dir: Optional[str] = _f(None, "Where token stores are prepared on first use (one folder per inputs + "
                                        "tokenizer); default $MOE_DIST_STORE_DIR or ~/.cache/moe_dist/token_stores.")
    num_proc: int = _f(0, "Processes tokenizing while a store is prepared (0 = one per CPU core, fewer for a "
                          "small corpus).")

    def __post_init__(self) -> None:
        _require(0.0 < self.val_fraction < 1.0, "data", "val_fraction", "between 0 and 1 (exclusive)", self.val_fraction)
        _require(self.num_proc >= 0, "data", "num_proc", ">= 0", self.num_proc)
        if isinstance(self.data_files, str):
            self.data_files = [p for p in self.data_files.split(",") if p]


@dataclass
class CheckpointConfig:
    """Where and how often state is saved, and what to resume from."""

    output_dir: str = _f("runs/default", "Run folder: metrics.jsonl and checkpoints/ live here.")
    save_every: int = _f(5000, "Save checkpoint_step_<N> every N optimizer steps (0 = only at the end).")
    keep_last: int = _f(0, "Keep only the newest K periodic checkpoints (0 = keep all).")
    resume: Optional[str] = _f(None, "A checkpoint folder, checkpoint_latest, or 'auto' (newest complete one, if any).")
    init_from: Optional[str] = _f(
        None, "Start from these weights only (a checkpoint, .pt, safetensors or --format hf export; any world "
              "size or EP degree): fresh optimizer, schedule and data cursor. A checkpoint found by --resume wins.")
    async_save: bool = _f(False, "Write checkpoints in the background while training continues.")
    stop_at_step: Optional[int] = _f(
        None, "Save and exit once this step is reached, without changing the LR schedule (for jobs with a time "
              "limit: the next job continues with --resume auto).")
    verify: bool = _f(True, "Verify the checkpoint manifest (sizes, checksums) before loading.")

    def __post_init__(self) -> None:
        _require(self.save_every >= 0, "checkpoint", "save_every", ">= 0", self.save_every)
        _require(self.keep_last >= 0, "checkpoint", "keep_last", ">= 0", self.keep_last)


SECTIONS = ("model", "parallel", "train", "data", "checkpoint")


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    preset: str = "tiny"

    def __post_init__(self) -> None:
        _require(
            self.train.seq_len <= self.model.max_seq_len, "train", "seq_len",
            f"<= model.max_seq_len ({self.model.max_seq_len})", self.train.seq_len,
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        kwargs = {}
        for sec in SECTIONS:
            sec_cls = type(getattr(cls(), sec))
            known = {f.name for f in fields(sec_cls)}
            kwargs[sec] = sec_cls(**{k: v for k, v in d.get(sec, {}).items() if k in known})
        return cls(preset=d.get("preset", "custom"), **kwargs)


def _section_classes() -> dict:
    return {"model": ModelConfig, "parallel": ParallelConfig, "train": TrainConfig, "data": DataConfig,
            "checkpoint": CheckpointConfig}
