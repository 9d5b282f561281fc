"""Developer tools for the repository (not shipped with the orchestrator package)."""
