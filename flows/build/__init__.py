"""How a corpus is built: the ingest planned as partitions (plan, partitions), each input
transformed by the worker (work), stages selected from the pool (stages), and the executors
that run the work in this process or on Ray (executors, ray_exec). The whole build is pipeline.
May import schemas, storage, transforms, and flows.report (a build ends with its report)."""
