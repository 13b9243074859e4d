"""The validation gate: shards scanned into rows (scan), Great Expectations suites run over
them (suites), failing samples removed and damaged shards quarantined (quarantine), and the
verdict written (gate). The verdict is read back by storage.verdict.
May import schemas, storage, transforms and flows.build (its executors)."""
