"""fairopt: fair and class-imbalance-aware training in JAX.

Modules (data flows one way: data -> losses/metrics -> solvers -> experiments):

* :mod:`fairopt.data`      real datasets (offline), synthetic generators, splits, group batchers
* :mod:`fairopt.losses`    per-example parametric losses and validation objectives
* :mod:`fairopt.metrics`   jit-able accuracy and fairness metrics
* :mod:`fairopt.hparams`   loss-hyperparameter parameterisations
* :mod:`fairopt.posterior` diagonal Gaussian posteriors over parameter pytrees
* :mod:`fairopt.sam`       sharpness-aware minimisation
* :mod:`fairopt.implicit`  Hessian-vector products and implicit hypergradients
* :mod:`fairopt.models`    the papers' MLP and a linear model (flax)
* :mod:`fairopt.solvers`   ERM family, FACIMS, AutoBalance, FairALM
"""

__version__ = "0.1.0"
