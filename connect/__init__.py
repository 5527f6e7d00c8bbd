"""The pull side of orderq (contract §7): platform connectors that poll incremental order APIs,
the watched import folder, and ``orderq import``. Everything here feeds the same intake as
``POST /v1/orders`` (:mod:`orderq.intake`), so a re-read order is a duplicate, never a new one.
"""
