"""Alembic migrations of the ledger schema (installed as `mendctl.migrations`).

mendctl.ledger finds this directory with importlib.resources and runs it in-process; it holds
env.py, script.py.mako and versions/ (one module per revision, `0001_initial.py` onwards).
"""
