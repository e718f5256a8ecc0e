"""The self-hosted image generator: its settings, the engine that runs a diffusers pipeline pair,
the loader that finds and loads the weights, and a tiny random-weight checkpoint for tests and
offline demos. Nothing is imported here: `settings` must stay importable without torch."""

# The modules other rooms may import; the loader is the engine's own.
__all__ = ["engine", "settings", "tiny"]
