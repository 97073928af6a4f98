"""Block servers: spans of a model's transformer blocks. Imports nothing heavy eagerly."""
