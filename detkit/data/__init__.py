"""detkit.data: see docs/architecture.md (filled in by later issues)."""
