"""The VITA-architecture model, stage plans, loader and loop."""
