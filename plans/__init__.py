"""Data types that ``pipeline/`` fills and ``sharding/`` uses: frequency blocking,
structured prune plans, QR table sizes, and the byte accounting of their compression ratio.

They live below both layers: nothing here imports ``pipeline`` or ``sharding``
(``tests/test_layering.py`` checks it). The computations that fill them
(``compute_blocking``, ``plan_for_cr``, the knapsack, ``plan_qr``) stay in ``pipeline/``.
"""
