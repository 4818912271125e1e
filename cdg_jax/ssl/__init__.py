"""Self-supervised pretraining with gated ResNets (the program's model half).

  models        the CIFAR/ImageNet ResNets built from gated layers
  pretraining   SSL networks, the framework table (SimCLR, MoCo v2, BYOL,
                SimSiam), optimiser, train state and the jitted train step
  losses        the SSL losses (NT-Xent, InfoNCE with a queue, BYOL's)
"""
