"""The presets: named ``RunConfig`` s a run starts from (``--preset``), before the config file and
``--set`` overrides. ``tiny`` is the CPU demo; ``4090``, ``b200`` and ``18b`` the seed's targets;
``100m`` the checkpoint / consolidation benchmarks' model."""

from __future__ import annotations

from .sections import ConfigError, ModelConfig, ParallelConfig, RunConfig, TrainConfig

# torch.finfo(torch.float32).eps, written out so the config stays torch-free: the seed's RMSNorm epsilon
# (``nn.RMSNorm(eps=None)`` on fp32 statistics).
FLOAT32_EPS = 2.0 ** -23

# The seed trainer's model options (blueberry-llm exp4_18b_moe_training): the function it computes, in
# training as in eval. A seed checkpoint imported into a run of these presets resumes its training.
SEED_MODEL_OPTIONS = dict(expert_type="silu_mlp", embed_scale=True, dropout=0.1, fused_qkv=True,
                          rope_layout="interleaved", norm_eps=FLOAT32_EPS, aux_loss_reduction="sum",
                          load_balancing_weight=0.01, router_noise_std=0.1, scaled_residual_init=False,
                          init_std=0.02, tie_embeddings=True)
# The seed's AdamW: betas (0.9, 0.999), its LR 0.1 x Muon's; weight decay on AdamW's parameters only.
SEED_ADAM_BETAS, SEED_ADAMW_LR_RATIO = (0.9, 0.999), 0.1


def _preset_tiny() -> RunConfig:
    return RunConfig(preset="tiny")


def _preset_4090() -> RunConfig:
    # The seed's 4090 config: ~600M params, the seed's model exactly (SEED_MODEL_OPTIONS).
    m = ModelConfig(vocab_size=50304, d_model=1024, n_layers=12, n_heads=8, d_ff=2752, num_experts=8, top_k=2,
                    max_seq_len=1024, **SEED_MODEL_OPTIONS)
    t = TrainConfig(global_batch_size=32, micro_batch_size=2, seq_len=1024, warmup_steps=500, max_steps=50000,
                    muon_lr=0.02, adamw_lr=SEED_ADAMW_LR_RATIO * 0.02, adam_betas=SEED_ADAM_BETAS,
                    weight_decay_on="adamw", eval_every=500, eval_batches=20)
    # ZeRO stage and offload come from the launch config (launch_configs/4090.json: ZeRO-1, no offload).
    p = ParallelConfig(activation_checkpointing=True)
    return RunConfig(model=m, train=t, parallel=p, preset="4090")


def _preset_b200() -> RunConfig:
    # The seed's final B200 config (d 2816, 22 heads, 30 layers, d_ff 7680, 8 experts), its model exactly.
    m = ModelConfig(vocab_size=50304, d_model=2816, n_layers=30, n_heads=22, d_ff=7680, num_experts=8, top_k=2,
                    max_seq_len=2048, **SEED_MODEL_OPTIONS)
    t = TrainConfig(global_batch_size=128, micro_batch_size=2, seq_len=2048, warmup_steps=1000, max_steps=100000,
                    muon_lr=0.01, adamw_lr=SEED_ADAMW_LR_RATIO * 0.01, adam_betas=SEED_ADAM_BETAS, weight_decay=0.1,
                    weight_decay_on="adamw", eval_every=1000, eval_batches=20)
    p = ParallelConfig(ep_size=8)  # ZeRO-2 + bf16 from launch_configs/b200_multinode.json
    return RunConfig(model=m, train=t, parallel=p, preset="b200")


def _preset_18b() -> RunConfig:
    # The model the project is named for: 16 layers of SwiGLU experts give ~18.6B parameters.
    m = ModelConfig(vocab_size=50304, d_model=4096, n_layers=16, n_heads=32, d_ff=11008, num_experts=8, top_k=2,
                    expert_type="swiglu", max_seq_len=4096)
    t = TrainConfig(global_batch_size=256, micro_batch_size=1, seq_len=4096, warmup_steps=2000, max_steps=100000,
                    muon_lr=0.01, adamw_lr=2e-4, eval_every=1000, eval_batches=20)
    p = ParallelConfig(ep_size=8, activation_checkpointing=True)
    return RunConfig(model=m, train=t, parallel=p, preset="18b")


def _preset_small() -> RunConfig:
    # ~100M parameters: for checkpoint / consolidation benchmarks on CPU.
    m = ModelConfig(vocab_size=320, d_model=512, n_layers=6, n_heads=8, d_ff=1280, num_experts=8, top_k=2,
                    max_seq_len=256)
    t = TrainConfig(seq_len=256)
    return RunConfig(model=m, train=t, preset="100m")


PRESETS = {"tiny": _preset_tiny, "100m": _preset_small, "4090": _preset_4090, "b200": _preset_b200,
           "18b": _preset_18b}


def get_preset(name: str) -> RunConfig:
    if name not in PRESETS:
        from ..cli_args import did_you_mean

        raise ConfigError(f"unknown preset {name!r}{did_you_mean(name, PRESETS)} (presets: {', '.join(PRESETS)})")
    return PRESETS[name]()
