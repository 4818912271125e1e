"""Evaluation of a pretrained backbone: kNN, linear probes, test-set FLOPs."""
