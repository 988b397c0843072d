"""Methods: the registry every method kind registers in (`registry`), and the ways to learn
a new task (`transfer`, `search`), a stream of tasks (`continual`) or a new domain
(`adapt`, a package of one module per setting), with the diagnostics of learned routes."""
