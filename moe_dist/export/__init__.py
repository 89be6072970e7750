"""Getting weights out of a training checkpoint, offline and rank-free: ``consolidate`` (the driver) with its
writers (``pt_writer``, ``safetensors_writer``, ``hf`` for transformers' Mixtral), its command line
(``consolidate_cli``: ``moe-consolidate``), and ``inference`` (``load_checkpoint``,
``load_model_for_inference``, ``moe-generate``)."""
