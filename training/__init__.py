"""The trainer (the model, stage plans, loader and loop): not built yet; see its issue."""
