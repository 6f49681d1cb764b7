# pyre-strict
"""Which rank owns which Shampoo block, and the exchange of the owners' updates."""
