"""CLI commands for flows (registered on import)."""
