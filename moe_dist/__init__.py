"""moe_dist: train Mixture-of-Experts LMs under Accelerate + DeepSpeed ZeRO with expert parallelism,
and checkpoint them through torch.distributed.checkpoint so they resume on any world size."""

__version__ = "0.1.0"
