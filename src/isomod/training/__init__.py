"""Training: the one loop (`trainer`), its config and device, route schedules and regimes,
objectives, batches, logs and run folders."""
