# pyre-strict
"""Distributed Shampoo: the optimizer's utilities and a world-size independent checkpoint layer."""
