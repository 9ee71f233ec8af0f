"""compose.yaml: every docqueue command in it is a real CLI command with options the CLI accepts,
and the deployment has the shape operations rely on (no Docker engine needed to check it): no
secret with a default, a preflight check everything waits for, Flower on loopback, the
application on its own database role, containers as a non-root user. And the preflight checker
itself (scripts/docker/preflight.py), as code."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import pytest
import typer
import yaml
from sqlalchemy import make_url
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
APP_SERVICES = ("api", "worker", "beat", "flower")
SECRETS = (
    "POSTGRES_PASSWORD",
    "REDIS_PASSWORD",
    "DOCQUEUE_DB_APP_PASSWORD",
    "DOCQUEUE_METRICS_TOKEN",
    "DOCQUEUE_FLOWER_BASIC_AUTH",
)
PREFLIGHT = ROOT / "scripts/docker/preflight.py"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return dict(yaml.safe_load((ROOT / "compose.yaml").read_text()))


def _services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return dict(compose["services"])


def _image_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Services running the docqueue image."""
    return {
        name: svc
        for name, svc in _services(compose).items()
        if svc.get("image") == "docqueue:latest"
        or "scripts/docker/Dockerfile" in str(svc.get("build", {}).get("dockerfile", ""))
    }


def _docqueue_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Services running the docqueue image whose entrypoint is the `docqueue` command."""
    return {n: s for n, s in _image_services(compose).items() if "entrypoint" not in s}


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
    # Bounded: past it a send fails and the dispatcher's chunks wait in PostgreSQL.
    assert _interpolate(args[args.index("--maxmemory") + 1], {}) == "256mb"
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


class Unset(Exception):
    """compose refuses the file: a ``${VAR:?message}`` whose variable is unset or empty."""


def _interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's ``${VAR}``, ``${VAR:-default}`` (defaults may nest) and ``${VAR:?message}``,
    enough for this file's values."""
    out, i = "", 0
    while i < len(value):
        if value.startswith("$$", i):
            out += "$"
            i += 2
        elif value.startswith("${", i):
            depth, j = 1, i + 2
            while depth:
                depth += {"{": 1, "}": -1}.get(value[j], 0)
                j += 1
            body = value[i + 2 : j - 1]
            name, op, rest = re.match(r"([A-Za-z_]\w*)(:-|:\?|)(.*)", body, re.S).groups()  # type: ignore[union-attr]
            if env.get(name):
                out += env[name]
            elif op == ":?":
                raise Unset(f"{name}: {rest}")
            else:
                out += _interpolate(rest, env)
            i = j
        else:
            out += value[i]
            i += 1
    return out


def _strings(node: Any) -> Iterator[str]:
    """Every string (keys too) in a parsed YAML document."""
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for k, v in node.items():
            yield from _strings(k)
            yield from _strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from _strings(v)


def _references(compose: dict[str, Any]) -> list[tuple[str, str]]:
    """(variable, operator) of every ``${...}`` and ``$VAR`` in the file, nested ones too."""
    refs = []
    for text in _strings(compose):
        text = text.replace("$$", "")
        refs += re.findall(r"\$\{([A-Za-z_]\w*)(:-|:\?|-|\?|:\+|\+|)", text)
        refs += [(name, "") for name in re.findall(r"\$([A-Za-z_]\w*)", text)]
    return refs


def _good_env() -> dict[str, str]:
    """Strong values for every secret (and the example's other settings)."""
    return {
        **_example_env(),
        "POSTGRES_PASSWORD": "pg" + "0" * 30,
        "REDIS_PASSWORD": "rd" + "1" * 30,
        "DOCQUEUE_DB_APP_PASSWORD": "ap" + "2" * 30,
        "DOCQUEUE_METRICS_TOKEN": "mt" + "3" * 30,
        "DOCQUEUE_FLOWER_BASIC_AUTH": "ops:" + "fl" + "4" * 30,
    }


def test_urls_default_to_this_file_and_a_remote_worker_can_point_elsewhere(
    compose: dict[str, Any],
) -> None:
    env = compose["x-docqueue"]["environment"]
    secrets = {"REDIS_PASSWORD": "r3d", "DOCQUEUE_DB_APP_PASSWORD": "app"}
    local = {k: _interpolate(v, secrets) for k, v in env.items()}
    assert (
        local["DOCQUEUE_DATABASE_URL"]
        == "postgresql+psycopg://docqueue_app:app@postgres:5432/docqueue"
    )
    assert local["DOCQUEUE_REDIS_URL"] == "redis://:r3d@redis:6379/0"  # Redis asks for it
    remote_env = {
        "DOCQUEUE_DATABASE_URL": "postgresql+psycopg://docqueue_app:app@10.0.0.5:5432/docqueue",
        "DOCQUEUE_REDIS_URL": "redis://:r3d@10.0.0.5:6379/0",
    }
    remote = {k: _interpolate(v, {**secrets, **remote_env}) for k, v in env.items()}
    assert {k: remote[k] for k in remote_env} == remote_env
    redis = _services(compose)["redis"]["command"]
    assert _interpolate(redis[redis.index("--requirepass") + 1], {"REDIS_PASSWORD": "r3d"}) == "r3d"
    for name, port in (("postgres", "5432"), ("redis", "6379")):
        (binding,) = _services(compose)[name]["ports"]
        assert _interpolate(binding, {}) == f"127.0.0.1:{port}:{port}"  # loopback by default
        assert _interpolate(binding, {"DOCQUEUE_BIND_ADDRESS": "10.0.0.5"}).startswith("10.0.0.5:")


# --- secrets ----------------------------------------------------------------------------------


def test_no_secret_has_a_default(compose: dict[str, Any]) -> None:
    """Every reference to a secret is ``${VAR:?...}``: never a default, never a bare ``$VAR``
    that compose would quietly read as empty."""
    refs = _references(compose)
    for secret in SECRETS:
        ops = {op for name, op in refs if name == secret}
        assert ops == {":?"}, (secret, ops)


def test_compose_refuses_the_file_without_each_secret(compose: dict[str, Any]) -> None:
    good = _good_env()
    for text in _strings(compose):
        _interpolate(text, good)  # every value resolves with all secrets set
    for secret in SECRETS:
        env = {k: v for k, v in good.items() if k != secret}
        with pytest.raises(Unset, match=secret):
            for text in _strings(compose):
                _interpolate(text, env)


def _depends(compose: dict[str, Any], name: str) -> dict[str, str]:
    return {
        dep: cond["condition"]
        for dep, cond in _services(compose)[name].get("depends_on", {}).items()
    }


def test_everything_waits_for_the_preflight_check(compose: dict[str, Any]) -> None:
    """No service starts, and so none serves with an example secret, unless preflight passed;
    preflight sees every secret and runs the checker the image carries."""
    services = _services(compose)
    preflight = services["preflight"]
    assert preflight["restart"] == "no" and not preflight.get("depends_on")
    assert preflight["entrypoint"] == ["python", "/app/scripts/docker/preflight.py"]
    assert "COPY scripts/docker/preflight.py ./scripts/docker/preflight.py" in _dockerfile()
    assert set(SECRETS) <= set(preflight["environment"])
    assert _depends(compose, "postgres")["preflight"] == "service_completed_successfully"
    assert _depends(compose, "redis")["preflight"] == "service_completed_successfully"
    for name in services:
        if name == "preflight":
            continue
        seen, todo = set(), [name]
        while todo:  # every path down ends at preflight, through conditions that wait
            for dep, cond in _depends(compose, todo.pop()).items():
                assert cond in ("service_healthy", "service_completed_successfully"), name
                if dep not in seen:
                    seen.add(dep)
                    todo.append(dep)
        assert "preflight" in seen, name
    assert "migrate" in _depends(compose, "flower")


# --- the application's database role ------------------------------------------------------------


def test_the_application_connects_as_its_own_role(compose: dict[str, Any]) -> None:
    """API, workers, beat and Flower use the role migrate creates, never the superuser, and the
    superuser's password does not reach their containers (.env comes in whole as env_file)."""
    services = _services(compose)
    env = _good_env()
    migrate = services["migrate"]["environment"]
    role = _interpolate(migrate["DOCQUEUE_DB_APP_ROLE"], env)
    assert role == "docqueue_app"
    owner = make_url(_interpolate(migrate["DOCQUEUE_DATABASE_URL"], env))
    assert owner.username == "postgres" and owner.password == env["POSTGRES_PASSWORD"]
    assert parse_docqueue(services["migrate"]["command"]).params["app_role"] is None  # from env
    for name in APP_SERVICES:
        svc = services[name]
        assert ".env" in svc["env_file"]
        app = make_url(_interpolate(svc["environment"]["DOCQUEUE_DATABASE_URL"], env))
        assert app.username == role != "postgres", name
        assert app.password == env["DOCQUEUE_DB_APP_PASSWORD"], name
        assert svc["environment"]["POSTGRES_PASSWORD"] == "", name
    # The role follows DOCQUEUE_DB_APP_ROLE on both sides.
    custom = {**env, "DOCQUEUE_DB_APP_ROLE": "dq_rw"}
    assert _interpolate(migrate["DOCQUEUE_DB_APP_ROLE"], custom) == "dq_rw"
    url = services["api"]["environment"]["DOCQUEUE_DATABASE_URL"]
    assert make_url(_interpolate(url, custom)).username == "dq_rw"


def test_the_api_gets_its_metrics_token(compose: dict[str, Any]) -> None:
    api = _services(compose)["api"]["environment"]
    assert _interpolate(api["DOCQUEUE_METRICS_TOKEN"], _good_env()) == "mt" + "3" * 30


# --- Flower ---------------------------------------------------------------------------------------


def test_flower_is_published_on_loopback_unless_told_otherwise(compose: dict[str, Any]) -> None:
    (binding,) = _services(compose)["flower"]["ports"]
    assert _interpolate(binding, {}) == "127.0.0.1:5555:5555"
    assert _interpolate(binding, {"FLOWER_BIND_ADDRESS": "10.0.0.5"}) == "10.0.0.5:5555:5555"
    for name, svc in _services(compose).items():
        for port in svc.get("ports", []):
            published = _interpolate(str(port), {})
            if "5555" in published:
                assert published.startswith("127.0.0.1:"), name


# --- the image ------------------------------------------------------------------------------------


def _dockerfile() -> str:
    return (ROOT / "scripts/docker/Dockerfile").read_text()


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined."""
    joined = re.sub(r"\\\n", " ", _dockerfile())
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_containers_run_as_an_unprivileged_user(compose: dict[str, Any]) -> None:
    """The image's last USER is a numeric non-root uid (runtimes can verify it), nothing after it
    switches back, and no service overrides it; the directories its volumes mount over belong
    to that user, so a fresh volume does too."""
    instructions = _instructions()
    users = [i for i, (word, _) in enumerate(instructions) if word == "USER"]
    assert users, "the Dockerfile sets no USER: containers run as root"
    last = users[-1]
    uid, _, gid = instructions[last][1].partition(":")
    assert uid.isdigit() and int(uid) >= 1000 and (not gid or int(gid) != 0)
    assert all(
        word in ("ENV", "EXPOSE", "ENTRYPOINT", "CMD") for word, _ in instructions[last:][1:]
    )
    created = [a for w, a in instructions if w == "RUN" and f"--uid {uid}" in a]
    assert created, "the user is created in the image"
    chowned = " ".join(a for w, a in instructions if w == "RUN" and f"chown -R {uid}" in a)
    for name, svc in _image_services(compose).items():
        assert str(svc.get("user", uid)).split(":")[0] not in ("0", "root"), name
        for volume in svc.get("volumes", []):
            source, _, target = volume.partition(":")
            if source in compose["volumes"]:  # a named volume: starts as the image's directory
                assert target in chowned.split(), (name, target)


# --- the preflight checker ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def preflight() -> ModuleType:
    spec = importlib.util.spec_from_file_location("preflight", PREFLIGHT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _named(found: list[str]) -> set[str]:
    return {line.split(" ")[0] for line in found}


def test_preflight_refuses_every_secret_of_the_example(preflight: ModuleType) -> None:
    example = _example_env()
    assert set(SECRETS) <= set(example)
    found = preflight.problems(example)
    assert _named(found) == set(SECRETS), found


def test_preflight_accepts_strong_distinct_secrets(preflight: ModuleType) -> None:
    assert preflight.problems(_good_env()) == []


@pytest.mark.parametrize(
    ("variable", "value", "why"),
    [
        ("POSTGRES_PASSWORD", "", "empty"),
        ("POSTGRES_PASSWORD", "   ", "empty"),
        ("POSTGRES_PASSWORD", "docqueue", "well-known"),
        ("POSTGRES_PASSWORD", "Postgres", "well-known"),
        ("REDIS_PASSWORD", "CHANGE-ME-please-0123456789", "placeholder"),
        ("DOCQUEUE_METRICS_TOKEN", "changeme", "well-known|placeholder"),
        ("DOCQUEUE_METRICS_TOKEN", "short-random-1", "shorter than 16"),
        ("DOCQUEUE_DB_APP_PASSWORD", "0123456789abcde", "shorter than 16"),
        ("DOCQUEUE_DB_APP_PASSWORD", "p@ss/word#0123456789", "break the URL"),
        ("REDIS_PASSWORD", "a-very-long-pass:word-0123", "break the URL"),
        ("DOCQUEUE_FLOWER_BASIC_AUTH", "admin:change-me", "placeholder"),
        ("DOCQUEUE_FLOWER_BASIC_AUTH", "ops:admin", "well-known"),
        ("DOCQUEUE_FLOWER_BASIC_AUTH", "ops:" + "f" * 20 + ",guest:hunter2", "shorter"),
        ("DOCQUEUE_FLOWER_BASIC_AUTH", "nocolon" * 4, "not user:password"),
        ("DOCQUEUE_FLOWER_BASIC_AUTH", ":" + "f" * 20, "not user:password"),
        ("DOCQUEUE_FLOWER_BASIC_AUTH", "", "empty"),
        ("DOCQUEUE_DB_APP_ROLE", "postgres", "must not be postgres"),
        ("DOCQUEUE_DB_APP_ROLE", 'app"; DROP', "lowercase"),
    ],
)
def test_preflight_refuses_a_weak_value_naming_its_variable(
    preflight: ModuleType, variable: str, value: str, why: str
) -> None:
    found = preflight.problems({**_good_env(), variable: value})
    assert len(found) == 1 and found[0].startswith(variable), found
    assert re.search(why, found[0]), found
    if len(value) > 3 and variable != "DOCQUEUE_DB_APP_ROLE":
        secret = value.rpartition(":")[2] if "AUTH" in variable else value
        assert secret.strip() not in found[0]  # the message never shows the value


def test_preflight_refuses_a_secret_used_twice(preflight: ModuleType) -> None:
    """The application's password equal to the superuser's undoes the separate role."""
    env = _good_env()
    found = preflight.problems({**env, "DOCQUEUE_DB_APP_PASSWORD": env["POSTGRES_PASSWORD"]})
    assert found == [
        "DOCQUEUE_DB_APP_PASSWORD is the same as POSTGRES_PASSWORD: every secret must be its own"
    ]
    flower = "ops:" + env["DOCQUEUE_METRICS_TOKEN"]
    found = preflight.problems({**env, "DOCQUEUE_FLOWER_BASIC_AUTH": flower})
    assert _named(found) == {"DOCQUEUE_FLOWER_BASIC_AUTH"}


def test_preflight_as_compose_runs_it() -> None:
    """The script itself: exit 1 naming each variable at fault (and no value), exit 0 when all
    are strong."""

    def run(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, str(PREFLIGHT)],
            env={"PATH": os.environ.get("PATH", ""), **env},
            capture_output=True,
            text=True,
            timeout=30,
        )

    example = run(_example_env())
    assert example.returncode == 1
    for secret in SECRETS:
        assert f"preflight: {secret} " in example.stderr
    assert "change-me" not in example.stderr
    assert run(_good_env()).returncode == 0
    missing = run({k: v for k, v in _good_env().items() if k != "REDIS_PASSWORD"})
    assert missing.returncode == 1 and "preflight: REDIS_PASSWORD is empty" in missing.stderr
