"""CLI commands for store (registered on import)."""
