"""Corpora made in code: the demo corpus in every supported format with deliberate bad inputs
(demo), and the scale corpus of N generated records (scale).
May import schemas, storage, transforms and flows.build (the scale corpus's worker)."""
