"""Tasks: prompts, counterfactuals and protocols of particular studies, built on the methods.
`entity_tracking` is the paper this toolkit reproduces."""
