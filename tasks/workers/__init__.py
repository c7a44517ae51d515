"""Ray workers and their driver: the Ray Train loops (training, distillation), asynchronous SGD's actors, the typed worker config, the stall watchdog, tune's scheduler."""
