"""The package version: a leaf module that imports nothing, so the daemon and
the CLI can name their version without importing the client."""

__version__ = "0.9.0"
