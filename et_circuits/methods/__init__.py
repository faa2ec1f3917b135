"""The methods: task-neutral functions of (model(s), PromptSets, position specs, heads, metric),
each returning one typed result. `path_patching` (one sweep of senders), `discovery` (steps of
path patching into a circuit), `sweep` (where in the prompt heads matter), `evaluation` (mean
ablation) and `minimality` (the IOI criteria on it), `dcm` (which heads carry what a set of
counterfactuals tests), `cmap` (patching across models) and `knockout` (blocking attention
edges). What two methods share lives in `et_circuits.core`."""
