"""The reference design's Python names (`telefuser.core.config`), kept as the schema's own models."""
