"""et_circuits: entity-tracking circuits in LLaMA models, on TransformerLens."""
