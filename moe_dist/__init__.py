"""moe_dist: train Mixture-of-Experts LMs under Accelerate + DeepSpeed ZeRO with expert parallelism,
and checkpoint them through torch.distributed.checkpoint so they resume on any world size."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy: ``import moe_dist`` stays light; the loaders pull in torch and the model on first use.
    if name in ("load_checkpoint", "load_model_for_inference"):
        from .export import inference

        return getattr(inference, name)
    raise AttributeError(f"module 'moe_dist' has no attribute {name!r}")
