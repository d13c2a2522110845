"""CLI commands for extract (registered on import)."""
