"""The stages behind the command line (`pipeline.cli` declares their arguments): each module's
commands call a recipe and write the files `results` names, read by the next stage."""
