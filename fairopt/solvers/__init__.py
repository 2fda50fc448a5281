"""Training methods as pure ``init / step / predict`` functions (:class:`fairopt.train.Solver`)."""

from fairopt.solvers.erm import ERMState, erm

__all__ = ["ERMState", "erm"]
