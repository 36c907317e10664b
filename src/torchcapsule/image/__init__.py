"""The project image: spec, rendering, lock, lint, build, tags."""
