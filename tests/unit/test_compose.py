"""compose.yaml: every docqueue command in it is a real CLI command with options the CLI accepts,
and the deployment has the shape operations rely on (no Docker engine needed to check it)."""

from __future__ import annotations

from typing import Any

import pytest
import typer
import yaml
from typer.core import TyperGroup

from service import cli
from service.settings import env_names
from tests.support import ROOT

try:  # recent typer ships its own copy of click; its commands use that copy's classes
    from typer._click.core import Context
    from typer._click.exceptions import UsageError
except ImportError:  # pragma: no cover - older typer on plain click
    from click import Context, UsageError  # type: ignore[assignment]

LONG_RUNNING = ("postgres", "redis", "api", "worker", "beat", "flower")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return dict(yaml.safe_load((ROOT / "compose.yaml").read_text()))


def _services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return dict(compose["services"])


def _docqueue_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Services running the docqueue image, whose entrypoint is the `docqueue` command."""
    return {
        name: svc
        for name, svc in _services(compose).items()
        if svc.get("image") == "docqueue:latest"
        or "scripts/docker/Dockerfile" in str(svc.get("build", {}).get("dockerfile", ""))
    }


def parse_docqueue(args: list[str]) -> Context:
    """Parses ``docqueue ARGS`` as the real CLI would, without running anything.

    Raises click's UsageError (unknown command or option, bad value, missing argument).
    """
    command: Any = typer.main.get_command(cli.app)
    ctx = Context(command, info_name="docqueue")
    rest = list(args)
    while isinstance(command, TyperGroup):
        if not rest:
            raise UsageError("no subcommand", ctx)
        name = rest.pop(0)
        sub = command.get_command(ctx, name)
        if sub is None:
            raise UsageError(f"no such command {name!r}", ctx)
        command = sub
        ctx = Context(command, info_name=name, parent=ctx)
    return command.make_context(ctx.info_name, rest, parent=ctx.parent)


def test_the_image_runs_docqueue() -> None:
    dockerfile = (ROOT / "scripts/docker/Dockerfile").read_text()
    assert 'ENTRYPOINT ["docqueue"]' in dockerfile


def test_the_parser_rejects_what_the_cli_rejects() -> None:
    parse_docqueue(["worker", "--gpus", "all", "--metrics-port", "9100"])
    for bad in (
        ["wroker"],
        ["worker", "--no-such-option"],
        ["worker", "--metrics-port", "many"],
        ["db"],
    ):
        with pytest.raises(UsageError):
            parse_docqueue(bad)


def test_every_docqueue_command_is_real(compose: dict[str, Any]) -> None:
    services = _docqueue_services(compose)
    assert set(services) >= {"migrate", "api", "worker", "beat", "flower"}
    for name, svc in services.items():
        args = svc["command"]
        assert isinstance(args, list) and all(isinstance(a, str) for a in args), name
        try:
            parse_docqueue(args)
        except UsageError as exc:
            pytest.fail(f"service {name}: `docqueue {' '.join(args)}`: {exc.format_message()}")


def test_redis_is_durable_and_never_evicts(compose: dict[str, Any]) -> None:
    redis = _services(compose)["redis"]
    args = redis["command"]
    assert args[0] == "redis-server"
    assert args[args.index("--appendonly") + 1] == "yes"
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction"
    assert any(v.endswith(":/data") for v in redis["volumes"])


def test_postgres_keeps_its_data_in_a_volume(compose: dict[str, Any]) -> None:
    pg = _services(compose)["postgres"]
    (volume,) = [v for v in pg["volumes"] if v.endswith(":/var/lib/postgresql/data")]
    assert volume.split(":")[0] in compose["volumes"]


def test_migrate_runs_once_before_the_rest(compose: dict[str, Any]) -> None:
    services = _services(compose)
    migrate = services["migrate"]
    assert migrate["command"] == ["db", "upgrade"] and migrate["restart"] == "no"
    for name in ("api", "worker", "beat"):
        dep = services[name]["depends_on"]["migrate"]
        assert dep["condition"] == "service_completed_successfully", name


def test_workers_reserve_gpus_and_serve_metrics(compose: dict[str, Any]) -> None:
    worker = _services(compose)["worker"]
    ctx = parse_docqueue(worker["command"])
    assert ctx.params["gpus"] == "all" and ctx.params["metrics_port"] == 9100
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    # One container takes the host's GPUs; its launcher runs one process per GPU (replicas
    # asking for count: 1 would all get GPU 0).
    assert "replicas" not in worker["deploy"]


def test_exactly_one_beat(compose: dict[str, Any]) -> None:
    beats = [n for n, s in _docqueue_services(compose).items() if s["command"][0] == "beat"]
    assert beats == ["beat"]
    assert _services(compose)["beat"].get("deploy", {}).get("replicas", 1) == 1


def test_flower_requires_auth_from_the_environment(compose: dict[str, Any]) -> None:
    flower = _services(compose)["flower"]
    ctx = parse_docqueue(flower["command"])
    assert ctx.params["no_auth"] is False and ctx.params["address"] == "0.0.0.0"
    assert ctx.params["persistent"] is True
    assert "DOCQUEUE_FLOWER_BASIC_AUTH" not in flower.get("environment", {})  # from .env only
    assert ".env" in flower["env_file"]
    assert _example_env()["DOCQUEUE_FLOWER_BASIC_AUTH"].count(":") == 1


def test_long_running_services_have_health_checks(compose: dict[str, Any]) -> None:
    services = _services(compose)
    for name in LONG_RUNNING:
        test = services[name].get("healthcheck", {}).get("test")
        assert test and test[0] in ("CMD", "CMD-SHELL"), name


def _example_env() -> dict[str, str]:
    pairs = {}
    for line in (ROOT / "scripts/docker/example.env").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            pairs[key] = value
    return pairs


def test_example_env_names_real_settings() -> None:
    known = env_names()
    env = _example_env()
    unknown = [k for k in env if k.startswith("DOCQUEUE_") and k not in known]
    assert not unknown
    assert env["DOCQUEUE_LOG_FORMAT"] in ("text", "json")


def _interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's ``${VAR:-default}`` (defaults may nest), enough for this file's values."""
    out, i = "", 0
    while i < len(value):
        if value.startswith("${", i):
            depth, j = 1, i + 2
            while depth:
                depth += {"{": 1, "}": -1}.get(value[j], 0)
                j += 1
            body = value[i + 2 : j - 1]
            name, _, default = body.partition(":-")
            out += env.get(name) or _interpolate(default, env)
            i = j
        else:
            out += value[i]
            i += 1
    return out


def test_urls_default_to_this_file_and_a_remote_worker_can_point_elsewhere(
    compose: dict[str, Any],
) -> None:
    env = compose["x-docqueue"]["environment"]
    local = {
        k: _interpolate(v, {"REDIS_PASSWORD": "r3d", "POSTGRES_PASSWORD": "pg"})
        for k, v in env.items()
    }
    assert (
        local["DOCQUEUE_DATABASE_URL"] == "postgresql+psycopg://postgres:pg@postgres:5432/docqueue"
    )
    assert local["DOCQUEUE_REDIS_URL"] == "redis://:r3d@redis:6379/0"  # Redis asks for it
    remote_env = {
        "DOCQUEUE_DATABASE_URL": "postgresql+psycopg://postgres:pg@10.0.0.5:5432/docqueue",
        "DOCQUEUE_REDIS_URL": "redis://:r3d@10.0.0.5:6379/0",
    }
    remote = {k: _interpolate(v, remote_env) for k, v in env.items()}
    assert remote == remote_env
    redis = _services(compose)["redis"]["command"]
    assert _interpolate(redis[redis.index("--requirepass") + 1], {"REDIS_PASSWORD": "r3d"}) == "r3d"
    for name, port in (("postgres", "5432"), ("redis", "6379")):
        (binding,) = _services(compose)[name]["ports"]
        assert _interpolate(binding, {}) == f"127.0.0.1:{port}:{port}"  # loopback by default
        assert _interpolate(binding, {"DOCQUEUE_BIND_ADDRESS": "10.0.0.5"}).startswith("10.0.0.5:")
