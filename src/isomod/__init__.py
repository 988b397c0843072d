"""isomod: compositional modular networks.

A pool of interchangeable residual modules; each task learns a route (the module to run
at each step), annealed to discrete or kept soft.
"""

from isomod.baselines import IndependentNets, PlainResNet
from isomod.checkpoint import load_checkpoint, save_checkpoint
from isomod.errors import CheckpointError, IsomodError, TrainingDiverged
from isomod.network import ModelConfig, ModularNet, TaskSpec
from isomod.pool import ModulePool
from isomod.objectives import Objective, Output
from isomod.route import Route
from isomod.route_schedule import RouteSchedule
from isomod.train import TrainConfig, Trainer, evaluate

__all__ = [
    "CheckpointError", "IndependentNets", "IsomodError", "ModelConfig", "ModularNet", "ModulePool",
    "Objective", "Output", "PlainResNet", "Route", "RouteSchedule", "TaskSpec", "TrainConfig", "Trainer", "TrainingDiverged",
    "evaluate", "load_checkpoint", "save_checkpoint",
]
