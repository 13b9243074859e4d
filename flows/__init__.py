"""How work runs. At this level: the CLI (cli), the Prefect flows (nightly, train_flow) and the
Prefect server helper; below it, one sub-package per concern (build, validation, report,
export, corpora). Nothing outside flows/ imports flows."""

import os

# Prefect's ephemeral API server runs its database migrations when it first starts in a fresh
# PREFECT_HOME; on a busy two-core machine that takes longer than Prefect's 20 s default, and
# the run would fail before doing any work. A user's own setting still wins.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
