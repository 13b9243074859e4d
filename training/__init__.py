"""The trainer: the VITA-architecture model, the stage plans, the loader and the loop."""
