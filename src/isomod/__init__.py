"""isomod: compositional modular networks.

A pool of interchangeable residual modules; each task learns a route (the module to run
at each step), annealed to discrete or kept soft.
"""

from isomod.core.baselines import IndependentNets, PlainResNet
from isomod.io.checkpoint import load_checkpoint, save_checkpoint
from isomod.errors import CheckpointError, IsomodError, TrainingDiverged
from isomod.core.network import ModelConfig, ModularNet, TaskSpec
from isomod.core.pool import ModulePool
from isomod.training.objectives import Objective, Output
from isomod.core.route import Route
from isomod.training.route_schedule import RouteSchedule
from isomod.training.trainer import TrainConfig, Trainer, evaluate

__all__ = [
    "CheckpointError", "IndependentNets", "IsomodError", "ModelConfig", "ModularNet", "ModulePool",
    "Objective", "Output", "PlainResNet", "Route", "RouteSchedule", "TaskSpec", "TrainConfig", "Trainer", "TrainingDiverged",
    "evaluate", "load_checkpoint", "save_checkpoint",
]
