"""Distributed pre-training: a coordinator owning the canonical parameters, per-task worker pools.

Modules: env (the environment variables), protocol (ranks and messages), staleness (async
admission), transport (process groups), coordinator, worker, launch (local), commands (CLI).
"""
