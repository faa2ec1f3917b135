"""The bottom layer: types, errors, prompt sets, hooks, restarted forward passes, metrics, file
writing, run settings and torch.distributed helpers. Knows no method and no task."""
