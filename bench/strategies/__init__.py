"""The strategies: how a cell is spread over its processes, and what that asks of the stack.

Rooms: ``strategy`` (a strategy as degrees, and the questions code asks it), ``registry`` (each strategy
name -> its Strategy: the one place that knows names; a user's own config file is described by what it
holds), ``constants`` (each framework's sizes, read by the renderer and the estimator alike),
``user_configs`` (a user's DeepSpeed JSON or accelerate YAML: read, checked, described, resolved for the cell),
``deepspeed_auto`` (a DeepSpeed JSON's "auto" values filled from the cell as accelerate and the Trainer fill them),
``render`` (a strategy as the accelerate YAML and DeepSpeed JSON users write, one renderer per framework),
``precision`` (the precision policy a cell runs under), ``build`` (how the cell's model is built: on meta,
on the host, upcast; read by the worker and the estimator alike), ``runnable`` (what can run where: every
reason a cell cannot run, before launch). Imports only bench.spec.
"""

from bench.strategies.registry import (CATALOGUE, USER_CONFIG_SUFFIXES, check_strategy_name, families, for_cell, get,
                                       is_user_config, names, of_record, register)
from bench.strategies.strategy import Family, Framework, Strategy
from bench.strategies.precision import PrecisionPolicy, policy_for
from bench.strategies.runnable import (cell_problems, check_names, check_runnable, collapse, name_problem, unrunnable,
                                       validate_cells)

__all__ = [
    "CATALOGUE", "Family", "Framework", "PrecisionPolicy", "Strategy", "USER_CONFIG_SUFFIXES", "cell_problems",
    "check_names", "check_runnable", "check_strategy_name", "collapse", "families", "for_cell", "get", "is_user_config",
    "name_problem", "names", "of_record", "policy_for", "register", "unrunnable", "validate_cells",
]
