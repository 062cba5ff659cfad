"""What training, evaluation and serving share below the model: devices, checkpoints, the allocator."""
