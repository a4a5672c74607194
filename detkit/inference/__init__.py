"""detkit.inference: see docs/architecture.md (filled in by later issues)."""
