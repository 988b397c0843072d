"""What leaves or enters a process: checkpoints, exported networks, predictions."""
