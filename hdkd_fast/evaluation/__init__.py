"""The evaluation early-exit papers report.

- :func:`exit_costs`: cumulative FLOPs to reach each exit (``FlopCounterMode``);
- :func:`anytime_accuracy`: top-1 / top-5 accuracy of every exit;
- :func:`budgeted_accuracy`: MSDNet's dynamic evaluation, (average cost, accuracy) points, over a q sweep
  of :data:`BUDGET_PROTOCOLS` (:func:`budget_q_grid`) or your own;
- :func:`plot_exit_accuracy`, :func:`plot_budgeted_accuracy`: PNG plots (need matplotlib).
"""

from .accuracy import (
    BUDGET_PROTOCOLS,
    DEFAULT_BUDGET_PROTOCOL,
    AnytimeAccuracy,
    BudgetCurve,
    anytime_accuracy,
    budget_q_grid,
    budgeted_accuracy,
    exit_quotas,
    geometric_exit_distribution,
)
from .costs import exit_costs
from .plots import plot_budgeted_accuracy, plot_exit_accuracy

__all__ = [
    "BUDGET_PROTOCOLS",
    "DEFAULT_BUDGET_PROTOCOL",
    "AnytimeAccuracy",
    "BudgetCurve",
    "anytime_accuracy",
    "budget_q_grid",
    "budgeted_accuracy",
    "exit_costs",
    "exit_quotas",
    "geometric_exit_distribution",
    "plot_budgeted_accuracy",
    "plot_exit_accuracy",
]
