"""What the data is: records, configs, shard manifests, reject reasons."""
