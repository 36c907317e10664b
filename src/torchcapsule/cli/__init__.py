"""The `capsule` command line: one module per verb group, loaded only when invoked."""
