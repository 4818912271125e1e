"""Self-supervised pretraining with gated ResNets (the program's model half).

Listed bottom-up: each module imports only the ones above it (and the
library, cdg_jax.gating; tests/test_packaging.py checks the program's order).

  losses        the SSL losses (NT-Xent, InfoNCE with a queue, BYOL's)
  models        the CIFAR/ImageNet ResNets built from gated layers
  optimizers    the learning-rate and EMA schedules, LARS/SGD, decay_mask
  frameworks    the framework table (SimCLR, MoCo v2, BYOL, SimSiam), their
                losses, the target's EMA and MoCo's queue
  pretraining   the settings, the SSL networks, the train state and the
                jitted train step
"""
