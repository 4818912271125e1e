"""Speed benchmarks: the train step, sparse execution, the PyTorch peer,
XLA:CPU levers, convolution formulations, profiles, processes, the data
path and gs:// workdirs."""
