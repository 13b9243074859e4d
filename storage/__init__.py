"""Where the data lives: URIs, dataset readers, shard writer/reader, manifests, rejects."""
