"""Training of up-scaled models: data, trainable set, DeepSpeed engine, loop, checkpoints, export."""
