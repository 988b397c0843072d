"""Methods as named units: a transfer or adaptation method is a registered function with
its setting and what it trains; `isomod transfer --method` and `isomod adapt --method` build
their choices and help from the registries.

    TRANSFER = Methods("transfer method")

    @TRANSFER.register("head_only", setting="transfer", trains="a new head over the source's frozen features")
    def head_only(model, task, source, config): ...
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from isomod.errors import check_choice


@dataclass(frozen=True)
class Method:
    """A registered method.

    Args:
        name: what `--method` takes.
        setting: where it applies (`transfer`; adaptation: `source_free`, `with_sources`,
            `few_labels`).
        trains: what it changes, in words (the CLI's help and the docs show it).
        run: the function that carries it out.
        learns_route: whether it learns the new task's route (route diagnostics apply).
        sets_route: whether it chooses the new task's route without learning it (its
            result is a route too: benches report it soft and discretised where it is soft).
        tunes: the learning rates a bench's selection rule may tune for it: fields of its
            `TrainConfig` (`lr`, `lr_routes`, `lr_heads`) or options (`finetune_lr`).
    """

    name: str
    setting: str
    trains: str
    run: Callable
    learns_route: bool = False
    sets_route: bool = False
    tunes: tuple[str, ...] = ()

    @property
    def routes(self) -> bool:
        """Whether its result is a route, learned or chosen."""
        return self.learns_route or self.sets_route


class Methods:
    """A registry of methods of one kind, in the order they were registered."""

    def __init__(self, what: str):
        self.what = what
        self._methods: dict[str, Method] = {}

    def register(self, name: str, setting: str, trains: str, learns_route: bool = False, sets_route: bool = False,
                 tunes: tuple[str, ...] = ()):
        """Register the decorated function as method `name`."""
        def add(fn: Callable) -> Callable:
            self._methods[name] = Method(name, setting, trains, fn, learns_route, sets_route, tuple(tunes))
            return fn
        return add

    def __getitem__(self, name: str) -> Method:
        check_choice(self.what, name, tuple(self._methods))
        return self._methods[name]

    def __contains__(self, name: str) -> bool:
        return name in self._methods

    def names(self, setting: str | None = None) -> tuple[str, ...]:
        """Every method's name, or those of one setting."""
        return tuple(n for n, m in self._methods.items() if setting is None or m.setting == setting)

    def help(self) -> str:
        """One clause per method, for `--help`."""
        return "; ".join(f"{m.name} ({m.setting}): {m.trains}" for m in self._methods.values())
