"""`docqueue beat`: its periodic tasks go to the ops queue its own worker consumes, and it never
loads the GPU worker's tasks (which would build an engine)."""

from __future__ import annotations

import subprocess
import sys


def test_beat_schedule_routes_every_task_to_the_ops_queue() -> None:
    from service.contract import OPS_QUEUE, TASK_RECONCILE, TASK_RETENTION, TASK_SCHEDULES_TICK
    from workers.ops.beat import app, command

    entries = app.conf.beat_schedule
    assert {e["task"] for e in entries.values()} == {
        TASK_SCHEDULES_TICK,
        TASK_RECONCILE,
        TASK_RETENTION,
    }
    assert all(e["options"]["queue"] == OPS_QUEUE for e in entries.values())
    assert {TASK_SCHEDULES_TICK, TASK_RECONCILE, TASK_RETENTION} <= set(app.tasks)
    cmd = " ".join(command())
    assert "-A workers.ops.beat worker --beat" in cmd and f"--queues {OPS_QUEUE}" in cmd
    # Interactive before bulk: the broker polls a worker's queues in the order given.
    assert app.conf.broker_transport_options["queue_order_strategy"] == "priority"


def test_beat_does_not_import_the_gpu_worker_tasks() -> None:
    code = (
        "import sys, workers.ops.beat; workers.ops.beat.app.loader.import_default_modules(); "
        "print('workers.tasks' in sys.modules, 'vllm' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
