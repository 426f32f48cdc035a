"""Store fixtures (filled in by the harvest stage)."""
