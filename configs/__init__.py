# Marks the Hydra config tree as a package so it ships (as `pipeline.configs`) with the code.
