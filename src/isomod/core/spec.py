"""TaskSpec: what the model and the data loaders both need to know about a task.

It lives apart from both so that `isomod.data` never imports the network.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from isomod.errors import IsomodError


@dataclass
class TaskSpec:
    """A task as the model sees it: a name, a class count, and the input shape.

    `source` says where its data comes from (a registered name, or the path of a
    user's folder or `.npz`), so a checkpoint can be evaluated without naming the data.
    `label_space` names the classes a task shares with others: tasks of one model with
    the same non-empty label space are *domains* and share one head ("" = an own head).
    """

    name: str
    num_classes: int
    input_shape: tuple[int, int, int] = (1, 28, 28)
    class_names: list[str] = field(default_factory=list)
    source: str = ""
    label_space: str = ""

    def __post_init__(self):
        self.input_shape = tuple(int(s) for s in self.input_shape)
        if self.num_classes < 2:
            raise IsomodError(f"task {self.name!r} needs at least 2 classes, got {self.num_classes}")
