"""The `overlay-node` command line."""
