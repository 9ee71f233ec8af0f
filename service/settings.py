"""One typed settings object for the API, the CLI and the workers (env prefix ``DOCQUEUE_``)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

MiB = 1024 * 1024


class Settings(BaseSettings):
    """Every knob in one place, so API, CLI and workers can never disagree on a default."""

    model_config = SettingsConfigDict(env_prefix="DOCQUEUE_", env_file=".env", extra="ignore")

    # Storage and queue.
    database_url: str = "postgresql+psycopg://postgres@127.0.0.1:5432/docqueue"
    redis_url: str = "redis://127.0.0.1:6379/0"
    # Seconds Redis keeps an unacked message invisible before redelivering it. Far above any
    # chunk's run time: Postgres leases, not Redis, decide when work is re-run.
    broker_visibility_timeout_s: int = 6 * 3600

    # Upload limits.
    max_document_bytes: int = Field(default=1 * MiB, gt=0)
    max_rows_per_job: int = Field(default=2_000_000, gt=0)
    max_upload_bytes: int = Field(default=8 * 1024 * MiB, gt=0)

    # Jobs.
    default_model: str = "smollm2-135m-instruct"
    default_chunk_size: int = Field(default=256, gt=0)
    max_chunk_size: int = Field(default=10_000, gt=0)
    default_max_tokens: int = Field(default=256, gt=0)

    # API server.
    api_host: str = "127.0.0.1"
    api_port: int = 8000

    # CLI client.
    api_url: str = "http://127.0.0.1:8000"
    api_key: str | None = None
    http_timeout_s: float = 600.0

    # Workers and leases. A chunk's lease is renewed every lease_s/3 while it runs, so a killed
    # worker's chunk is re-run about lease_s after it died, not after the broker's timeout.
    lease_s: int = Field(default=60, ge=2)
    max_attempts: int = Field(default=3, ge=1)  # per chunk, counting the first
    retry_backoff_s: float = Field(default=5.0, ge=0)  # doubled per attempt, capped at 5 minutes
    reconcile_interval_s: float = Field(default=30.0, gt=0)
    # A queued chunk whose message is in neither the queue nor the unacked set after this long
    # is re-sent (its message was lost: Redis flushed, restarted without persistence ...).
    requeue_after_s: float = Field(default=60.0, ge=0)
    worker_heartbeat_s: float = Field(default=10.0, gt=0)
    worker_concurrency: int = Field(default=3, ge=1)  # chunks in flight per engine
    sub_batch_size: int = Field(default=64, ge=1)  # results are written per sub-batch

    # Engines.
    engine: str = "vllm"  # vllm | transformers | bench (zero-cost, benchmarks only)
    max_model_len: int | None = None  # default: the model's own
    vllm_gpu_memory_utilization: float = 0.90
    vllm_kv_cache_gib: float = 2.0  # CPU backend only (VLLM_CPU_KVCACHE_SPACE)
    vllm_max_num_seqs: int | None = None
    vllm_dtype: str = "auto"
    # None: eager on CPU hosts (vLLM-CPU recompiles on every start, 60-100 s more), compiled
    # (CUDA graphs) on GPUs.
    vllm_enforce_eager: bool | None = None
    tensor_parallel_size: int = 1

    # Prompts.
    summary_words: int = Field(default=60, gt=0)

    log_level: str = "INFO"

    # Operations: Flower, metrics, logs.
    log_format: Literal["text", "json"] = "text"  # json: one object per line, for collectors
    # "user:password" (several: comma-separated). `docqueue flower` refuses to start without it
    # unless --no-auth is given: Flower can revoke tasks and shows every job's arguments.
    flower_basic_auth: SecretStr | None = None
    flower_port: int = 5555
    flower_address: str = "127.0.0.1"
    flower_persistent: bool = True  # keep Flower's task history across restarts (bounded)
    flower_db_path: Path = Path.home() / ".cache" / "docqueue" / "flower.db"
    flower_max_tasks: int = Field(default=10_000, gt=0)  # tasks Flower keeps (memory bound)
    flower_state_save_interval_s: float = Field(default=60.0, ge=0)  # 0: save at exit only
    # Base port of the workers' Prometheus endpoints: the launcher gives its i-th Celery process
    # port + i (one process per GPU). None: no worker metrics endpoint.
    worker_metrics_port: int | None = Field(default=None, gt=0, lt=65536)
    # The API's /metrics aggregates over every job row: answer scrapes within this many seconds
    # of the last one from memory, so several scrapers (or API processes) cost one query set.
    metrics_cache_s: float = Field(default=5.0, ge=0)
    worker_metrics_address: str = "0.0.0.0"  # Prometheus scrapes workers from other hosts

    # Collections, schedules, retention.
    schedule_tick_s: float = Field(default=30.0, gt=0)  # how often beat looks for due schedules
    # Results (and documents) of jobs finished longer ago than this are purged; the job row and
    # its counts stay, marked results_expired_at.
    retention_days: float = Field(default=30.0, gt=0)
    retention_interval_s: float = Field(default=3600.0, gt=0)  # how often beat purges
    retention_batch_rows: int = Field(default=10_000, gt=0)  # rows deleted per transaction
    retention_max_pass_s: float = Field(default=300.0, gt=0)  # a pass stops here; next resumes
    # Workers also run the reconciler in-process (at start and every reconcile_interval_s);
    # with `docqueue beat` running it is a beat task too, and this can be turned off.
    reconcile_in_workers: bool = True
    beat_concurrency: int = Field(default=2, ge=1)  # ops tasks in flight in `docqueue beat`


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Settings are read once per process; tests clear the cache after changing the env."""
    return Settings()
