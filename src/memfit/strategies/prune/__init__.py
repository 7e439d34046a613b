"""Pruning: removing what matters least so that the bytes held really fall.

- `memfit.strategies.prune.sparse`: unstructured and N:M sparsity (magnitude, Wanda, SparseGPT)
  held as kept values plus a bitmask (`SparseLinear`).
- `memfit.strategies.prune.structured`: whole MLP channels, attention heads (key/value groups)
  and decoder layers removed, shapes shrunk, the config rewritten.
"""
