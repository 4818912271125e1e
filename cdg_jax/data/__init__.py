"""Data: sources (TFDS, npz, synthetic), batches on devices, augmentation.

  input_pipeline   sources, splits, the validation hold-out
  batching         host-to-device batches, prefetch
  augment          on-device SimCLR/BYOL augmentation (dm_pix)
"""
