# pyre-strict
"""Shampoo's Kronecker-factored preconditioner and the grafting preconditioners, per block."""
