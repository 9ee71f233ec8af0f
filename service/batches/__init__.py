"""OpenAI's Batch API on docqueue's jobs: a batch is a job, its input file's lines its documents."""
