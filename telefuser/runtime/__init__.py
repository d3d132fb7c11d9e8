"""Plan -> video: plan checks, model loading, the Wan pipeline stages, the mp4 writer (see docs/runtime.md)."""
