"""The model: blocks, the pool of modules, routes, the network that runs them, the
baselines with the same interface, and task specs. Imports nothing from training."""
