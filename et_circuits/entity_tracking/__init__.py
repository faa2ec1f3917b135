"""The entity-tracking task of the paper: prompts (`data`), DCM desiderata (`desiderata`) and
the paper's protocol over the toolkit's methods (`recipe`)."""
