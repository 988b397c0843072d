"""Methods as named units: a transfer or adaptation method is a registered function with
its setting and what it changes; the CLI, the benches and the docs read those attributes
from the registry and never name a method themselves.

    TRANSFER = Methods("transfer method")

    @TRANSFER.register("head_only", setting="transfer", trains="a new head over the source's frozen features",
                       changes={"head"}, baseline_for=("transfer",))
    def head_only(t: NewTask) -> TransferResult: ...

Every method has one signature: `run(given) -> result`, `given` the context its kind defines
(`Target` for adaptation, `NewTask` for transfer), `result` what it produced, trained.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from isomod.errors import IsomodError, check_choice

ROLES = ("statistics", "route", "norms", "head", "network")  # what a method may change


@dataclass(frozen=True)
class Method:
    """A registered method.

    Args:
        name: what `--method` takes, and the name its result rows carry.
        setting: where it applies (`transfer`; adaptation: `source_free`, `with_sources`,
            `few_labels`).
        trains: what it changes, in words (the CLI's help and the docs show it).
        run: the function that carries it out: `run(given) -> result`.
        learns_route: whether it learns the new task's route (route diagnostics apply).
        sets_route: whether it chooses the new task's route without learning it (its
            result is a route too: benches report it soft and discretised where it is soft).
        tunes: the learning rates a bench's selection rule may tune for it: fields of its
            `TrainConfig` (`lr`, `lr_routes`, `lr_heads`) or options (`finetune_lr`).
        changes: what of the model it changes (`ROLES`): `statistics`, `route`, `norms`
            (affine parameters), `head` (a head of its own), `network` (stem, pool and the heads
            it shares).
        searches: whether it takes a search config (the `search` option).
        baseline_for: the settings in which benches measure other methods against it.
        compare: the methods a bench pairs it with, run by run.
        style: its plot marker and colour.
        default: whether it is its kind's default (`--method` unset).
        row_name: the name its result rows carry when not its own.
        formerly: names it had in earlier versions (results files written then are read
            with this name).
    """

    name: str
    setting: str
    trains: str
    run: Callable
    learns_route: bool = False
    sets_route: bool = False
    tunes: tuple[str, ...] = ()
    changes: frozenset[str] = frozenset()
    searches: bool = False
    baseline_for: tuple[str, ...] = ()
    compare: tuple[str, ...] = ()
    style: tuple[str, str] = ("o", "tab:gray")
    default: bool = False
    row_name: str = ""
    formerly: tuple[str, ...] = ()

    @property
    def routes(self) -> bool:
        """Whether its result is a route, learned or chosen."""
        return self.learns_route or self.sets_route

    @property
    def whole_network(self) -> bool:
        """Whether it trains stem and pool, every number of the network."""
        return "network" in self.changes

    @property
    def owns_head(self) -> bool:
        """Whether the new task gets a head of its own."""
        return "head" in self.changes

    @property
    def route_alone(self) -> bool:
        """Whether it changes the route and norm statistics and nothing else."""
        return "route" in self.changes and self.changes <= {"route", "statistics"}

    @property
    def row(self) -> str:
        """The method name its result rows carry."""
        return self.row_name or self.name


class Methods:
    """A registry of methods of one kind, in the order they were registered."""

    def __init__(self, what: str):
        self.what = what
        self._methods: dict[str, Method] = {}

    def register(self, name: str, setting: str, trains: str, *, changes: Iterable[str] = (), **attributes):
        """Register the decorated function as method `name` (`attributes`: see `Method`)."""
        unknown = set(changes) - set(ROLES)
        if unknown:
            raise IsomodError(f"method {name}: unknown roles {sorted(unknown)}; known: {', '.join(ROLES)}")

        taken = set(self._methods) | set(self.renamed())
        clash = ({name} | set(attributes.get("formerly", ()))) & taken
        if clash:
            raise IsomodError(f"method {name}: the name {sorted(clash)[0]!r} is taken by another {self.what} "
                              "(a name, or a former name, names one method)")

        def add(fn: Callable) -> Callable:
            self._methods[name] = Method(name, setting, trains, fn, changes=frozenset(changes), **attributes)
            return fn
        return add

    def __getitem__(self, name: str) -> Method:
        if name in self.renamed():
            raise IsomodError(f"{self.what} {name!r} is called {self.renamed()[name]!r} now")
        check_choice(self.what, name, tuple(self._methods))
        return self._methods[name]

    def __contains__(self, name: str) -> bool:
        return name in self._methods

    def __iter__(self):
        return iter(self._methods.values())

    def names(self, setting: str | None = None) -> tuple[str, ...]:
        """Every method's name, or those of one setting."""
        return tuple(n for n, m in self._methods.items() if setting is None or m.setting == setting)

    def where(self, test: Callable[[Method], bool]) -> tuple[str, ...]:
        """The names of the methods `test` holds for, in registration order."""
        return tuple(m.name for m in self._methods.values() if test(m))

    def baselines(self, setting: str) -> tuple[str, ...]:
        """The methods other methods of `setting` are measured against."""
        return self.where(lambda m: setting in m.baseline_for)

    def default(self) -> str:
        """The name of the kind's default method."""
        found = self.where(lambda m: m.default)
        if len(found) != 1:
            raise IsomodError(f"{self.what}: {len(found)} methods are marked default, one must be")
        return found[0]

    def by_row(self, row: str) -> Method | None:
        """The method whose result rows carry the name `row` (None: an analysis row)."""
        return next((m for m in self._methods.values() if m.row == row), None)

    def renamed(self) -> dict[str, str]:
        """Each former method name to its name now."""
        return {old: m.name for m in self._methods.values() for old in m.formerly}

    def help(self) -> str:
        """One clause per method, for `--help`."""
        return "; ".join(f"{m.name} ({m.setting}): {m.trains}" for m in self._methods.values())
