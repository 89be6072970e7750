"""DeepSpeed ZeRO behind the engine seam (:mod:`moe_dist.parallel.engine`): the one folder that
knows DeepSpeed's internals."""
