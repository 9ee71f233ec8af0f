"""docqueue service: API, settings, data model, ingest, export and CLI."""

__version__ = "0.1.0"
