"""One typed settings object for the API, the CLI and the workers, grouped by concern.

Code reads ``settings.worker.lease_s``; the environment says ``DOCQUEUE_LEASE_S``. Each field
names its environment variable once (``env(...)``); only ``DOCQUEUE_*`` variables (from the
process environment, or a ``.env`` file in the working directory) are read, so a stray ``PORT``
or ``HOST`` never leaks in. A bad value fails at start, naming the variable.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from dotenv import dotenv_values
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

MiB = 1024 * 1024
ENV_PREFIX = "DOCQUEUE_"


def env(name: str, default: Any = ..., **constraints: Any) -> Any:
    """A field read from ``DOCQUEUE_<name>``; code may still pass it by its field name."""
    return Field(default, validation_alias=ENV_PREFIX + name, **constraints)


class _Group(BaseModel):
    model_config = ConfigDict(populate_by_name=True, validate_assignment=True)


class DatabaseSettings(_Group):
    url: str = env("DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/docqueue")
    # A statement waiting on a row lock longer than this fails (and is retried or reported)
    # instead of queueing behind it: one slow tenant's lock never stalls everyone's leases.
    lock_timeout_s: float = env("DB_LOCK_TIMEOUT_S", 10.0, gt=0)
    # The role the API, workers and beat connect as: `docqueue db upgrade` (run as the schema's
    # owner) creates it, or resets its password, with rights on rows only (no DDL, no
    # ownership, not a superuser). Unset: `db upgrade` only migrates.
    app_role: str | None = env("DB_APP_ROLE", None, pattern=r"^[a-z_][a-z0-9_]{0,62}$")
    app_password: SecretStr | None = env("DB_APP_PASSWORD", None)


class BrokerSettings(_Group):
    url: str = env("REDIS_URL", "redis://127.0.0.1:6379/0")
    # Seconds Redis keeps an unacked message invisible before redelivering it. Far above any
    # chunk's run time: PostgreSQL leases, not Redis, decide when work is re-run.
    visibility_timeout_s: int = env("BROKER_VISIBILITY_TIMEOUT_S", 6 * 3600, gt=0)


class JobSettings(_Group):
    """What a job may be and its defaults; the upload limits bound every stored byte."""

    max_document_bytes: int = env("MAX_DOCUMENT_BYTES", 1 * MiB, gt=0)
    max_rows_per_job: int = env("MAX_ROWS_PER_JOB", 2_000_000, gt=0)
    max_upload_bytes: int = env("MAX_UPLOAD_BYTES", 8 * 1024 * MiB, gt=0)
    default_model: str = env("DEFAULT_MODEL", "smollm2-135m-instruct")
    default_chunk_size: int = env("DEFAULT_CHUNK_SIZE", 256, gt=0)
    # A job that names no chunk_size is cut into at most this many chunks (each at least
    # default_chunk_size rows): every chunk costs a row, a claim, a message and a dispatch
    # pass, which for a million short rows in 256-row chunks outweighs the rows themselves.
    chunks_per_job: int = env("CHUNKS_PER_JOB", 1000, gt=0)
    max_chunk_size: int = env("MAX_CHUNK_SIZE", 10_000, gt=0)
    # Smaller chunks are refused: each chunk is a row, a claim and a message, so a million-row
    # job at chunk_size=1 would cost a million of each.
    min_chunk_size: int = env("MIN_CHUNK_SIZE", 8, gt=0)
    default_max_tokens: int = env("DEFAULT_MAX_TOKENS", 256, gt=0)
    summary_words: int = env("SUMMARY_WORDS", 60, gt=0)
    # Bounds on what one upload may make PostgreSQL store beyond its documents' text: the
    # columns of a file, and the bytes of its non-text columns (`extra`) per row.
    max_columns: int = env("MAX_COLUMNS", 256, gt=0)
    max_extra_bytes: int = env("MAX_EXTRA_BYTES", 64 * 1024, gt=0)
    # JSONL and Parquet uploads (service/jobs/formats.py): a JSONL line is read whole, so it is
    # bounded (a 1 MiB document escaped as \uXXXX fits); a Parquet row group is read whole
    # (uncompressed, as its metadata says) and the footer before it, so both are bounded.
    max_jsonl_line_bytes: int = env("MAX_JSONL_LINE_BYTES", 8 * MiB, gt=0)
    max_parquet_row_group_bytes: int = env("MAX_PARQUET_ROW_GROUP_BYTES", 256 * MiB, gt=0)
    max_parquet_metadata_bytes: int = env("MAX_PARQUET_METADATA_BYTES", 16 * MiB, gt=0)
    # A prompt template's length, and the length a rendered prompt may reach (before the
    # tokenizer truncates it to the model's context): a row over it is that row's error.
    max_template_chars: int = env("MAX_TEMPLATE_CHARS", 64 * 1024, gt=0)
    max_prompt_chars: int = env("MAX_PROMPT_CHARS", 2 * MiB, gt=0)
    # A job for a model no live worker serves is accepted with a warning (workers may start
    # later); true: it is a 422 listing the served models (strict deployments).
    reject_unserved_models: bool = env("REJECT_UNSERVED_MODELS", False)


class ApiSettings(_Group):
    host: str = env("API_HOST", "127.0.0.1")
    port: int = env("API_PORT", 8000, gt=0, lt=65536)
    # The API's /metrics aggregates over every job row: answer scrapes within this many seconds
    # of the last one from memory, so several scrapers (or API processes) cost one query set.
    metrics_cache_s: float = env("METRICS_CACHE_S", 5.0, ge=0)
    # Bearer token GET /metrics requires (Prometheus: `authorization: {credentials: ...}`).
    # None: /metrics answers 404, so a deployment never exposes it by accident.
    metrics_token: SecretStr | None = env("METRICS_TOKEN", None)
    # Bodies other than uploads (JSON requests) are refused past this many bytes received.
    max_json_bytes: int = env("MAX_JSON_BYTES", 1 * MiB, gt=0)
    # Result downloads at once per API process, and how long one may wait on a slow reader
    # before it is cut off: each holds a database connection and a snapshot.
    max_concurrent_exports: int = env("MAX_CONCURRENT_EXPORTS", 8, gt=0)
    export_send_timeout_s: float = env("EXPORT_SEND_TIMEOUT_S", 60.0, gt=0)
    # Processes per API process that parse uploads (service.jobs.pool), so ingest never holds
    # the serving threads. None: one per core; 0: in the serving thread (tests, debugging).
    submit_processes: int | None = env("SUBMIT_PROCESSES", None, ge=0)


class ClientSettings(_Group):
    """The CLI as a client of the API."""

    url: str = env("API_URL", "http://127.0.0.1:8000")
    key: str | None = env("API_KEY", None)
    http_timeout_s: float = env("HTTP_TIMEOUT_S", 600.0, gt=0)


class WorkerSettings(_Group):
    """Leases, retries and the reconciler. A chunk's lease is renewed every lease_s/3 while it
    runs, so a killed worker's chunk is re-run about lease_s after it died."""

    lease_s: int = env("LEASE_S", 60, ge=2)
    max_attempts: int = env("MAX_ATTEMPTS", 3, ge=1)  # per chunk, counting the first
    retry_backoff_s: float = env("RETRY_BACKOFF_S", 5.0, ge=0)  # doubled per attempt, jittered
    reconcile_interval_s: float = env("RECONCILE_INTERVAL_S", 30.0, gt=0)
    # A queued chunk whose message is in neither the queue nor the unacked set after this long
    # is re-sent (its message was lost: Redis flushed, restarted without persistence ...).
    requeue_after_s: float = env("REQUEUE_AFTER_S", 60.0, ge=0)
    heartbeat_s: float = env("WORKER_HEARTBEAT_S", 10.0, gt=0)
    # Chunks in flight per engine. While a chunk's slowest rows finish, the engine must still
    # have rows waiting: 4 chunks of 256 keep 256 sequences running (with 3, the simulated GPU
    # of scripts/bench/gpusim.py had free slots and nothing waiting in 39% of its steps, not
    # 11% as with every prompt at once). An engine with more slots needs more chunks.
    concurrency: int = env("WORKER_CONCURRENCY", 4, ge=1)
    sub_batch_size: int = env("SUB_BATCH_SIZE", 64, ge=1)  # results are written per sub-batch
    # A chunk whose engine produced nothing for this long (alive but hung) is given back and
    # the worker's engine restarted; leases alone would be renewed forever.
    progress_deadline_s: float = env("PROGRESS_DEADLINE_S", 600.0, gt=0)
    # Workers also run the reconciler in-process (at start and every reconcile_interval_s);
    # with `docqueue beat` running it is a beat task too, and this can be turned off.
    reconcile_in_workers: bool = env("RECONCILE_IN_WORKERS", True)
    # Base port of the workers' Prometheus endpoints: the launcher gives its i-th Celery process
    # port + i (one process per GPU). None: no worker metrics endpoint.
    metrics_port: int | None = env("WORKER_METRICS_PORT", None, gt=0, lt=65536)
    metrics_address: str = env("WORKER_METRICS_ADDRESS", "0.0.0.0")  # scraped from other hosts


class DispatchSettings(_Group):
    """The dispatcher (service/dispatcher.py): chunks wait in PostgreSQL and are released to
    their model's queues only as workers can take them."""

    # Messages a model may have waiting in Redis beyond what its live workers hold in flight
    # (their Celery slots): enough that a worker finishing a chunk finds the next one at once,
    # few enough that another tenant's new job waits behind only these.
    ahead: int = env("DISPATCH_AHEAD", 4, ge=1)


class QuotaSettings(_Group):
    """Default per-tenant quotas (a tenant's own values, set by an admin, override these).

    Generous on purpose: they stop one tenant from taking the whole service (its workers, its
    database, its GPUs' day), not ordinary use. Past one, a submission is a 429 naming it."""

    # Jobs open at once (queued, running or cancelling): each holds chunks in the dispatcher.
    running_jobs: int = env("QUOTA_RUNNING_JOBS", 100, gt=0)
    # Documents of the tenant's open jobs without a result yet, this upload's included.
    queued_rows: int = env("QUOTA_QUEUED_ROWS", 10_000_000, gt=0)
    # Bytes uploaded as jobs per UTC day, this upload's included.
    upload_bytes_per_day: int = env("QUOTA_UPLOAD_BYTES_PER_DAY", 100 * 1024 * MiB, gt=0)
    # Output (completion) tokens per UTC day: a submission is refused once the day's reach it.
    output_tokens_per_day: int = env("QUOTA_OUTPUT_TOKENS_PER_DAY", 1_000_000_000, gt=0)
    # What Retry-After says past running_jobs or queued_rows (they free up as work finishes);
    # the daily quotas say the seconds until the next UTC midnight.
    retry_after_s: int = env("QUOTA_RETRY_AFTER_S", 30, gt=0)


class OpenAISettings(_Group):
    """The OpenAI-compatible surface (service/batches/): names, limits and OpenAI's defaults."""

    # Model names clients may use for a served model, so code naming an OpenAI model runs
    # unchanged: "gpt-4o-mini=HuggingFaceTB/SmolLM2-135M-Instruct,gpt-4o=/models/big".
    model_aliases: dict[str, str] = env("MODEL_ALIASES", {})
    # Requests in one batch file (OpenAI's own limit), and the longest line read.
    batch_max_requests: int = env("BATCH_MAX_REQUESTS", 50_000, gt=0)
    batch_max_line_bytes: int = env("BATCH_MAX_LINE_BYTES", 2 * MiB, gt=0)
    # OpenAI's default is "until the context is full": a request without max_tokens gets this.
    batch_default_max_tokens: int = env("BATCH_DEFAULT_MAX_TOKENS", 1024, gt=0)
    # A finished batch's output and error files are written from this many rows per read
    # (one short transaction each): what the finalizer holds in memory at once.
    batch_finalize_page_rows: int = env("BATCH_FINALIZE_PAGE_ROWS", 1000, gt=0)
    # A batch left ``finalizing`` this long without progress (its finalizer died) is retaken;
    # a live finalizer renews its claim after every page.
    batch_finalize_stale_s: float = env("BATCH_FINALIZE_STALE_S", 600.0, gt=0)
    # Batches one sweep (a reconciler pass) finalizes or expires at most; the next resumes.
    batch_sweep_limit: int = env("BATCH_SWEEP_LIMIT", 100, gt=0)
    # An output or error file's largest size (n choices with logprobs outgrow the input).
    batch_output_max_bytes: int = env("BATCH_OUTPUT_MAX_BYTES", 64 * 1024 * MiB, gt=0)

    @field_validator("model_aliases", mode="before")
    @classmethod
    def _aliases(cls, value: Any) -> Any:
        """``alias=model`` pairs, comma-separated (or a mapping, from code)."""
        if not isinstance(value, str):
            return value
        pairs: dict[str, str] = {}
        for item in filter(None, (part.strip() for part in value.split(","))):
            alias, sep, model = (x.strip() for x in item.partition("="))
            if not sep or not alias or not model:
                raise ValueError(f"{item!r} is not alias=model")
            pairs[alias] = model
        return pairs

    def resolve_model(self, name: str) -> str:
        """The served model a client's model name stands for (itself unless an alias)."""
        return self.model_aliases.get(name, name)


class EngineSettings(_Group):
    # bench: zero-cost; sim: a simulated GPU's step times (workers/engines/sim.py); both are
    # for benchmarks only.
    # transformers: Hugging Face models vLLM does not serve (encoder classifiers, older GPUs,
    # CPU-only hosts), batched by a token budget (workers/engines/transformers_engine.py).
    kind: Literal["vllm", "transformers", "bench", "sim"] = env("ENGINE", "vllm")
    max_model_len: int | None = env("MAX_MODEL_LEN", None, gt=0)  # default: the model's own
    gpu_memory_utilization: float = env("VLLM_GPU_MEMORY_UTILIZATION", 0.90, gt=0, le=1)
    kv_cache_gib: float = env("VLLM_KV_CACHE_GIB", 2.0, gt=0)  # CPU backend only
    max_num_seqs: int | None = env("VLLM_MAX_NUM_SEQS", None, gt=0)
    dtype: Literal["auto", "half", "float16", "bfloat16", "float", "float32"] = env(
        "VLLM_DTYPE", "auto"
    )
    # None or false: compiled, vLLM's default (eager costs vLLM-CPU 7-10% of its tokens/s; a
    # CPU start compiles 7-15 s from a warm cache, a minute or more the first time). true:
    # eager, the quick start tests use.
    enforce_eager: bool | None = env("VLLM_ENFORCE_EAGER", None)
    tensor_parallel_size: int = env("TENSOR_PARALLEL_SIZE", 1, ge=1)
    # The transformers engine's step: at most this many tokens, rows x (longest prompt + most
    # new tokens) with the padding, and at most this many rows. dtype above applies to it too.
    transformers_batch_tokens: int = env("TRANSFORMERS_BATCH_TOKENS", 16_384, gt=0)
    transformers_max_batch_rows: int = env("TRANSFORMERS_MAX_BATCH_ROWS", 128, gt=0)
    # The simulated engine (DOCQUEUE_ENGINE=sim): a decode step of sim_step_ms plus
    # sim_step_ms_per_seq per running sequence, at most sim_max_num_seqs running, and the
    # prompts a step admits prefilled at sim_prefill_tokens_per_ms in that step.
    sim_step_ms: float = env("SIM_STEP_MS", 15.0, gt=0)
    sim_step_ms_per_seq: float = env("SIM_STEP_MS_PER_SEQ", 0.02, ge=0)
    sim_max_num_seqs: int = env("SIM_MAX_NUM_SEQS", 256, gt=0)
    sim_prefill_tokens_per_ms: float = env("SIM_PREFILL_TOKENS_PER_MS", 50.0, gt=0)


class LogSettings(_Group):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = env("LOG_LEVEL", "INFO")
    format: Literal["text", "json"] = env("LOG_FORMAT", "text")  # json: one object per line


class FlowerSettings(_Group):
    # "user:password" (several: comma-separated). `docqueue flower` refuses to start without it
    # unless --no-auth is given: Flower can revoke tasks and shows every job's arguments.
    basic_auth: SecretStr | None = env("FLOWER_BASIC_AUTH", None)
    port: int = env("FLOWER_PORT", 5555, gt=0, lt=65536)
    address: str = env("FLOWER_ADDRESS", "127.0.0.1")
    persistent: bool = env("FLOWER_PERSISTENT", True)  # keep task history across restarts
    db_path: Path = env("FLOWER_DB_PATH", Path.home() / ".cache" / "docqueue" / "flower.db")
    max_tasks: int = env("FLOWER_MAX_TASKS", 10_000, gt=0)  # tasks Flower keeps (memory bound)
    state_save_interval_s: float = env("FLOWER_STATE_SAVE_INTERVAL_S", 60.0, ge=0)  # 0: at exit


class BeatSettings(_Group):
    schedule_tick_s: float = env("SCHEDULE_TICK_S", 30.0, gt=0)  # how often due schedules run
    concurrency: int = env("BEAT_CONCURRENCY", 2, ge=1)  # ops tasks in flight in `docqueue beat`


class RetentionSettings(_Group):
    """Results (and documents) of jobs finished longer ago than ``days`` are purged; the job
    row and its counts stay, marked results_expired_at."""

    days: float = env("RETENTION_DAYS", 30.0, gt=0)
    interval_s: float = env("RETENTION_INTERVAL_S", 3600.0, gt=0)  # how often beat purges
    batch_rows: int = env("RETENTION_BATCH_ROWS", 10_000, gt=0)  # rows deleted per transaction
    max_pass_s: float = env("RETENTION_MAX_PASS_S", 300.0, gt=0)  # a pass stops; next resumes


class FileSettings(_Group):
    """The OpenAI-compatible Files API (service/files): files live in PostgreSQL, in parts."""

    # Bytes per stored part (one file_parts row): what one read or write of a file holds in
    # memory, and what a content download sends per database round trip.
    part_bytes: int = env("FILE_PART_BYTES", 1 * MiB, ge=4096, le=64 * MiB)
    # A batch file's life when its upload names no expires_after (OpenAI's 30 days); past it,
    # retention purges the file.
    default_expires_s: int = env("FILE_DEFAULT_EXPIRES_S", 30 * 24 * 3600, ge=3600)
    # Parts retention deletes per transaction when it purges an expired file.
    purge_batch_parts: int = env("FILE_PURGE_BATCH_PARTS", 64, gt=0)


class _DocqueueEnv(PydanticBaseSettingsSource):
    """``DOCQUEUE_*`` from ``.env`` then the process environment (which wins), sorted into the
    groups by each field's variable name. Names are matched case-insensitively, as before."""

    def __init__(self, settings_cls: type[BaseSettings], env_file: str | None) -> None:
        super().__init__(settings_cls)
        found: dict[str, str] = {}
        if env_file and Path(env_file).is_file():
            found.update(
                {k.upper(): v for k, v in dotenv_values(env_file).items() if v is not None}
            )
        found.update(
            {k.upper(): v for k, v in os.environ.items() if k.upper().startswith(ENV_PREFIX)}
        )
        self.found = found

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # __call__ below does the work

    def __call__(self) -> dict[str, Any]:
        out: dict[str, dict[str, str]] = {}
        for group, info in self.settings_cls.model_fields.items():
            model = info.annotation
            if not (isinstance(model, type) and issubclass(model, _Group)):
                continue
            for field in model.model_fields.values():
                name = str(field.validation_alias)
                if name in self.found:
                    out.setdefault(group, {})[name] = self.found[name]
        return out


class Settings(BaseSettings):
    """Every knob in one place, so API, CLI and workers can never disagree on a default."""

    model_config = SettingsConfigDict(env_file=".env", extra="forbid")

    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    broker: BrokerSettings = Field(default_factory=BrokerSettings)
    jobs: JobSettings = Field(default_factory=JobSettings)
    api: ApiSettings = Field(default_factory=ApiSettings)
    client: ClientSettings = Field(default_factory=ClientSettings)
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    dispatch: DispatchSettings = Field(default_factory=DispatchSettings)
    openai: OpenAISettings = Field(default_factory=OpenAISettings)
    quotas: QuotaSettings = Field(default_factory=QuotaSettings)
    engine: EngineSettings = Field(default_factory=EngineSettings)
    logs: LogSettings = Field(default_factory=LogSettings)
    flower: FlowerSettings = Field(default_factory=FlowerSettings)
    beat: BeatSettings = Field(default_factory=BeatSettings)
    retention: RetentionSettings = Field(default_factory=RetentionSettings)
    files: FileSettings = Field(default_factory=FileSettings)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        env_file = settings_cls.model_config.get("env_file")
        return init_settings, _DocqueueEnv(settings_cls, str(env_file) if env_file else None)


def env_names() -> dict[str, str]:
    """Every ``DOCQUEUE_*`` variable and the field it sets (``"worker.lease_s"``)."""
    names: dict[str, str] = {}
    for group, info in Settings.model_fields.items():
        model = info.annotation
        assert isinstance(model, type) and issubclass(model, _Group)
        for name, field in model.model_fields.items():
            names[str(field.validation_alias)] = f"{group}.{name}"
    return names


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Settings are read once per process; tests clear the cache after changing the env."""
    return Settings()
