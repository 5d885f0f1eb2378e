"""Distributed pre-training: a coordinator owning the canonical parameters, per-task worker pools.

Modules: protocol (ranks and messages), staleness (async admission), transport (process
groups), coordinator, worker, launch (local). The environment variables are read in mtssl.env,
the commands are in mtssl.cli.
"""
