"""The client: route choice, inference sessions, generation. Imports nothing heavy eagerly."""
