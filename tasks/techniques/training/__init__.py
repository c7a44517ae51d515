"""Training: the epoch loop and its settings, in-process fine-tuning, rank agreement, model averaging, the parameter server, FSDP sharding."""
