"""Running the program: the config parse, checkpoints, logging, processes.

  config_lib       base config, recipes, variants, and the one parse into
                   typed specs (`validate`)
  checkpoints      orbax checkpoints, the exported backbone, resume checks
  metric_logging   metrics.jsonl, TensorBoard, the console
  run_control      workdir lock, preemption signals
  parallel         the device mesh, several hosts
  memory           the train step's memory estimate, before any work
  cli              flags, quiet logging, errors reported as one message
  plots            gate-mask figures
"""
