"""The seed trainer (blueberry-llm ``exp4_18b_moe_training``): its checkpoints read safely, its key names
mapped to ours, its whole training state imported into a moe_dist run folder."""
