"""The accelerator protocol (step benchmark and a budgeted dense/CDG
training on a lent GPU or TPU) and the data it reads."""
