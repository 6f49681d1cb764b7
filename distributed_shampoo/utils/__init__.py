# pyre-strict
"""Utilities the Distributed Shampoo optimizer and its checkpoint layer are built from.

Users import each utility from its own module, e.g.
``from distributed_shampoo.utils.shampoo_utils import merge_small_dims``.
"""
