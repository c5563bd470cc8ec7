"""Studies: several training runs compared honestly, with their statistics, report and plots.

    from choicelm.study import run_routing_study
    run_routing_study("configs/shakespeare.yaml", "data/", "studies/routing",
                      arms=["dense", "tc2", "ec", "ec_threshold", "et"], seeds=3, max_time=300)

A study sits at the services layer: it drives train/, api, data/ and models/; only cli imports it.
The arm table (study/arms.py) imports no torch, so the CLI can list it cheaply.
"""

from .arms import ARMS, Arm

__all__ = ["ARMS", "Arm", "run_routing_study"]


def __getattr__(name):
    if name == "run_routing_study":
        from .routing import run_routing_study

        return run_routing_study
    raise AttributeError(name)
