"""The launch layer: turns a validated config into a job on an executor. Only this layer (and the
CLI above it) may know about schedulers or import submitit."""
