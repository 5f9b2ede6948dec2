"""Whole-volume inference, in the order a run goes through it:

``settings`` (the run's records) -> ``prepare`` (checks, ``preflight``, ``intensity``,
``lattice``) -> ``plan`` -> ``cluster`` -> ``outputs`` -> ``graph`` (one task per block of
tiles and per chunk) -> ``tasks`` (``runtime``: the worker's caches; ``noise``, ``blend``)
-> ``run_record``; ``enhance`` drives them, ``inprocess`` runs the tasks in a plain loop.
"""
