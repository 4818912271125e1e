"""Diagnostics of trained runs: kNN against linear evaluation, feature
norms, accuracy with the gates forced open."""
