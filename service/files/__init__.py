"""The OpenAI-compatible Files API's store: files in PostgreSQL, in bounded parts."""
