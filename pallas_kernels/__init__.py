"""Pallas kernels for the eviction step (score update, redundancy, top-k retention).

Each op will live in its own folder (reference.py, pallas.py, __init__.py dispatching on
`implementation`); until then `gkv_jax.eviction.select` runs the XLA reference for every
`EvictionConfig.implementation`.
"""
