"""Asset fixtures (filled in by the data stage)."""
