"""et_circuits: entity-tracking circuits in LLaMA models, on TransformerLens."""

import os

# Idle OpenMP workers spin by default; on shared or small CPUs that makes small models many
# times slower. Must be set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
