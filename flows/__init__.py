"""How work runs: the build, the demo corpus, the CLI."""
