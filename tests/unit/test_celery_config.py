"""The worker-side Celery settings that long GPU work depends on."""

from __future__ import annotations


def test_worker_settings() -> None:
    from workers.app import app

    app.loader.import_default_modules()  # what a worker does at start (conf.imports)

    conf = app.conf
    assert conf.task_acks_late is True
    assert conf.task_reject_on_worker_lost is True
    assert conf.worker_prefetch_multiplier == 1
    assert conf.task_ignore_result is True
    assert conf.worker_send_task_events is True and conf.task_send_sent_event is True
    assert conf.worker_cancel_long_running_tasks_on_connection_loss is True
    assert conf.enable_utc is True
    # Far above any chunk's run time: Postgres leases decide re-runs, not Redis.
    assert conf.broker_transport_options["visibility_timeout"] >= 3600
    assert "docqueue.run_chunk" in app.tasks
