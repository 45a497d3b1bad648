"""The small core every layer shares: node-meta keys, group and plan types, pass infrastructure.

Nothing in here imports :mod:`passes` or the method (scheduler, training); a test checks it.
"""
