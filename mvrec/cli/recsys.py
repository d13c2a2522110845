"""CLI commands for recsys (registered on import)."""
