"""cdg_jax: Contrastive Dual Gating (dynamic spatial pruning learned during
contrastive self-supervised learning) in JAX and Flax."""

__version__ = '0.1.0'
