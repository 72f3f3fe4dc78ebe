"""docker-compose.yml and the Dockerfile say what DESIGN.md says an operator runs.

No Docker engine is needed: the compose file is parsed with PyYAML (anchors and `<<`
merges resolved, as compose does) and the Dockerfile is read as text.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
FLEET_FILE = ROOT / "docker-compose.fleet.yml"
DOCKERFILE = ROOT / "Dockerfile"

#: DESIGN.md's process table, with `-l INFO` added to the Celery workers.
PROCESS_COMMANDS = {
    "gpu": "celery -A tasks worker -Q gpu -P prefork -c 1 -n gpu@%h -l INFO",
    "enhance": "celery -A tasks worker -Q enhance -P prefork -c 1 -n enhance@%h -l INFO",
    "cpu": "celery -A tasks worker -Q cpu -n cpu@%h -l INFO",
    "bridge": "python -m worker bridge",
    "flower": "celery -A tasks flower --port=5555",
    "api": "python -m worker api",
}

GPU_SERVICES = ("gpu", "enhance")

#: DESIGN.md's configuration table: the deployment interface.
CONFIG_NAMES = frozenset(
    {
        "REDIS_URL",
        "PLATFORM_REDIS_URL",
        "PLATFORM_QUEUE",
        "WAN_MODEL_PATH",
        "WAN_VACE_MODEL_PATH",
        "QWEN_MODEL_PATH",
        "DEVICE",
        "DTYPE",
        "STORAGE_BACKEND",
        "OUTPUT_DIR",
        "SPOOL_DIR",
        "SUPABASE_URL",
        "SUPABASE_SERVICE_KEY",
        "CALLBACK_URL",
        "JOB_CALLBACK_SECRET",
        "WAN_WORKER_API_KEY",
        "API_HOST",
        "API_PORT",
        "PUBLIC_URL",
        "REFERENCE_ALLOWED_HOSTS",
        "WORKER_HOST",
    }
)
#: Not settings of ours, but read by the libraries and CUDA.
EXTRA_ENV_NAMES = frozenset({"HF_HUB_OFFLINE", "CUDA_VISIBLE_DEVICES"})

#: Values that must come from the host environment, never be written in the file.
#: PLATFORM_REDIS_URL too: the platform's Redis URL carries its password.
SECRET_NAMES = (
    "SUPABASE_SERVICE_KEY",
    "JOB_CALLBACK_SECRET",
    "WAN_WORKER_API_KEY",
    "PLATFORM_REDIS_URL",
)


# --- helpers ---------------------------------------------------------------------------


def _load_compose(path: Path = COMPOSE_FILE) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert isinstance(data, dict) and isinstance(data.get("services"), dict), data
    return data


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return _load_compose()


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


def _command(service: dict[str, Any]) -> str:
    command = service.get("command")
    if isinstance(command, list):
        return " ".join(str(part) for part in command)
    return str(command)


def _environment(service: dict[str, Any]) -> dict[str, str | None]:
    """A service's environment as a dict, from either the mapping or the list form."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        pairs = (item.split("=", 1) if "=" in item else (item, None) for item in env)
        return {name: value for name, value in pairs}
    return {str(name): None if value is None else str(value) for name, value in env.items()}


def _mounts(service: dict[str, Any]) -> list[dict[str, Any]]:
    """A service's volumes in compose's long form, whichever form the file uses."""
    mounts = []
    for entry in service.get("volumes") or []:
        if isinstance(entry, dict):
            mounts.append(entry)
            continue
        parts = str(entry).split(":")
        source, target = (parts[0], parts[1]) if len(parts) > 1 else (None, parts[0])
        is_path = source is not None and source.startswith((".", "/", "~", "$"))
        mounts.append(
            {
                "type": "bind" if is_path else "volume",
                "source": source,
                "target": target,
                "read_only": len(parts) > 2 and "ro" in parts[2].split(","),
            }
        )
    return mounts


def _gpu_reservations(service: dict[str, Any]) -> list[dict[str, Any]]:
    deploy = service.get("deploy") or {}
    devices = deploy.get("resources", {}).get("reservations", {}).get("devices") or []
    return [
        device
        for device in devices
        if device.get("driver") == "nvidia" and "gpu" in (device.get("capabilities") or [])
    ]


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per logical line: comments dropped, `\\` lines joined."""
    logical: list[str] = []
    pending = ""
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    if pending:
        logical.append(pending)
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in logical]


# --- processes -------------------------------------------------------------------------


def test_every_process_of_the_design_table_runs_with_its_exact_command(services):
    for name, expected in PROCESS_COMMANDS.items():
        assert name in services, f"service {name!r} missing"
        assert _command(services[name]) == expected, name


def test_no_service_runs_anything_but_a_process_of_the_table(services):
    known = PROCESS_COMMANDS
    for name, service in services.items():
        if name == "redis":
            continue
        assert name in known, f"service {name!r} is not in DESIGN.md's process table"
        assert _command(service) == known[name], name


def test_all_workers_share_one_image_built_from_the_dockerfile(services):
    workers = {name: s for name, s in services.items() if name != "redis"}
    images = {s.get("image") for s in workers.values()}
    assert len(images) == 1 and None not in images, images
    for name, service in workers.items():
        build = service.get("build")
        assert build is not None, f"{name} has no build"
        if isinstance(build, dict):
            assert build.get("context", ".") == "."
            assert build.get("dockerfile", "Dockerfile") == "Dockerfile"
        else:
            assert build == "."


def test_workers_restart_and_wait_for_a_healthy_redis(services):
    for name, service in services.items():
        assert service.get("restart") == "unless-stopped", name
        if name == "redis":
            continue
        depends = service.get("depends_on")
        assert isinstance(depends, dict), f"{name}: depends_on must name a condition"
        assert depends.get("redis", {}).get("condition") == "service_healthy", name


def test_redis_keeps_its_data_and_reports_health(compose, services):
    redis = services["redis"]
    assert str(redis["image"]).startswith("redis:7")
    assert "--appendonly yes" in _command(redis)
    assert "--appendfsync everysec" in _command(redis)
    test = redis["healthcheck"]["test"]
    assert "redis-cli ping" in (" ".join(test) if isinstance(test, list) else test)
    data = [m for m in _mounts(redis) if m["target"] == "/data"]
    assert data and data[0]["type"] == "volume", "redis /data must be a named volume"
    assert data[0]["source"] in (compose.get("volumes") or {})


def test_flower_publishes_port_5555(services):
    ports = [str(p) for p in services["flower"].get("ports") or []]
    assert any(p.split(":")[-1] == "5555" for p in ports), ports


# --- GPUs ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", GPU_SERVICES)
def test_gpu_workers_reserve_an_nvidia_gpu_and_pin_it(services, name):
    assert _gpu_reservations(services[name]), f"{name} reserves no nvidia GPU"
    pinned = _environment(services[name]).get("CUDA_VISIBLE_DEVICES")
    assert pinned is not None and re.fullmatch(r"\d+(,\d+)*", pinned), pinned


@pytest.mark.parametrize("name", ["cpu", "bridge", "flower"])
def test_light_processes_hold_no_gpu(services, name):
    assert not _gpu_reservations(services[name]), f"{name} must not reserve a GPU"


@pytest.mark.parametrize("name", GPU_SERVICES)
def test_model_paths_point_into_a_read_only_models_mount(services, name):
    service = services[name]
    read_only = [m["target"] for m in _mounts(service) if m.get("read_only")]
    env = _environment(service)
    for var in ("WAN_MODEL_PATH", "WAN_VACE_MODEL_PATH", "QWEN_MODEL_PATH"):
        path = env.get(var)
        assert path, f"{name}: {var} unset"
        assert any(path.startswith(t.rstrip("/") + "/") for t in read_only), (var, path)
    assert env.get("HF_HUB_OFFLINE") == "1", f"{name} may reach the hub"


# --- spool -----------------------------------------------------------------------------


def test_generation_and_media_workers_share_the_spool(compose, services):
    spools = {}
    for name in ("gpu", "cpu"):
        spool_dir = _environment(services[name]).get("SPOOL_DIR")
        assert spool_dir, f"{name}: SPOOL_DIR unset"
        at_spool = [m for m in _mounts(services[name]) if m["target"] == spool_dir]
        assert len(at_spool) == 1, f"{name}: nothing mounted at SPOOL_DIR={spool_dir}"
        assert at_spool[0]["type"] == "volume", f"{name}: the spool must be a named volume"
        spools[name] = (at_spool[0]["source"], spool_dir)
    assert spools["gpu"] == spools["cpu"], spools
    assert spools["gpu"][0] in (compose.get("volumes") or {})


def test_the_processes_of_a_host_share_one_worker_host_that_outlives_their_containers(
    services,
):
    # The media stages go to `cpu.<WORKER_HOST>` of the generating worker: the gpu and cpu
    # containers must agree on it, and its default (the hostname) is the container id in
    # Docker. The bridge keeps the items in hand in `{queue}:processing:<WORKER_HOST>` and
    # recovers only that list at start: a recreated container must see its predecessor's.
    hosts = {name: _environment(services[name]).get("WORKER_HOST") for name in ("bridge", "gpu",
             "enhance", "cpu")}  # fmt: skip
    assert hosts["gpu"], "WORKER_HOST is not set"
    assert "{{" not in hosts["gpu"], "a Go template would change with the container"
    assert set(hosts.values()) == {hosts["gpu"]}, hosts


def test_the_api_publishes_7860_needs_a_key_and_checks_its_health(services):
    api = services["api"]
    assert "7860:7860" in api["ports"]
    assert _environment(api)["WAN_WORKER_API_KEY"].startswith("${WAN_WORKER_API_KEY:?")
    assert "/health" in " ".join(api["healthcheck"]["test"])


# --- environment -----------------------------------------------------------------------


def test_every_environment_name_is_a_design_setting(services):
    allowed = CONFIG_NAMES | EXTRA_ENV_NAMES
    for name, service in services.items():
        unknown = set(_environment(service)) - allowed
        assert not unknown, f"{name} sets names outside DESIGN.md: {sorted(unknown)}"


def test_workers_use_the_compose_redis_and_supabase_storage(services):
    for name in ("gpu", "enhance", "cpu", "bridge"):
        env = _environment(services[name])
        assert env.get("REDIS_URL") == "redis://redis:6379/0", name
        assert env.get("STORAGE_BACKEND") == "supabase", name
        for var in ("SUPABASE_URL", "SUPABASE_SERVICE_KEY", "JOB_CALLBACK_SECRET"):
            assert env.get(var), f"{name}: {var} not passed"


def test_secrets_are_references_to_the_host_environment(services):
    for name, service in services.items():
        env = _environment(service)
        for secret in SECRET_NAMES:
            if secret not in env or env[secret] is None:  # absent, or `- NAME` pass-through
                continue
            # `${NAME}` or `${NAME:?message}`: a `:-default` would be a literal secret.
            reference = rf"\$\{{{secret}(:?\?[^}}]*)?\}}"
            assert re.fullmatch(reference, env[secret]), f"{name}: {secret} is a literal"


def test_the_compose_file_holds_no_key_material():
    text = COMPOSE_FILE.read_text(encoding="utf-8")
    # Supabase keys: JWTs (eyJ...) or the newer sb_secret_/sb_publishable_ keys.
    assert not re.search(r"eyJ[\w-]{10,}|sb_secret_|sb_publishable_", text)


# --- Dockerfile ------------------------------------------------------------------------


def test_dockerfile_installs_requirements_txt():
    instructions = _dockerfile_instructions()
    copies = [args for op, args in instructions if op == "COPY"]
    assert any(re.match(r"(--\S+\s+)*requirements\.txt\s", args) for args in copies)
    installs = [
        args
        for op, args in instructions
        if op == "RUN" and re.search(r"pip\s+install\b.*\s-r\s+\S*requirements\.txt", args)
    ]
    assert installs, "no RUN pip install -r requirements.txt"


def test_dockerfile_takes_torch_from_the_pytorch_cuda_index():
    text = DOCKERFILE.read_text(encoding="utf-8")
    assert re.search(r"https://download\.pytorch\.org/whl/cu\d+", text)
    assert "--extra-index-url" in text


def test_dockerfile_runs_unprivileged_in_app():
    instructions = _dockerfile_instructions()
    base = next(args for op, args in instructions if op == "FROM")
    assert base.startswith(("pytorch/pytorch:", "nvidia/cuda:")), base
    users = [args.split(":")[0] for op, args in instructions if op == "USER"]
    assert users and users[-1] not in ("root", "0"), users
    workdirs = [args for op, args in instructions if op == "WORKDIR"]
    assert workdirs and workdirs[-1] == "/app", workdirs


def test_dockerfile_copies_every_package_of_the_repo():
    # Code is copied package by package (keeping .env and .venv out of the image), so a
    # new top-level package must be added there or the workers fail to import it.
    copied = " ".join(args for op, args in _dockerfile_instructions() if op == "COPY")
    packages = [
        p.name
        for p in ROOT.iterdir()
        if (p / "__init__.py").is_file() and p.name not in {"tests", "bench"}
    ]
    for name in [*packages, "tasks", "worker", "enhancement", "media", "celeryconfig.py"]:
        assert re.search(rf"(^|\s){re.escape(name)}/?(\s|$)", copied), f"{name} not copied"


# --- a fleet: docker-compose.fleet.yml, run on every host ------------------------------

#: The process table's commands; a generation worker's node is named after its card.
FLEET_COMMANDS = {
    "gpu": re.compile(r"celery -A tasks worker -Q gpu -P prefork -c 1 -n gpu(\d+)@%h -l INFO"),
    **{name: re.compile(re.escape(command)) for name, command in PROCESS_COMMANDS.items()
       if name != "gpu"},
}  # fmt: skip
#: The services of the one hub host; every other host runs the rest.
HUB_SERVICES = {"redis", "enhance", "bridge", "api", "flower"}
#: The Sentinel variant (profile `sentinel`): replicas of the hub's Redis and three sentinels.
SENTINEL_SERVICES = {"redis-replica1", "redis-replica2", "sentinel1", "sentinel2", "sentinel3"}
#: How a worker reaches Redis through the sentinels; the passwords are secrets.
SENTINEL_SETTINGS = ("REDIS_SENTINELS", "REDIS_MASTER_NAME", "REDIS_PASSWORD",
                     "REDIS_SENTINEL_PASSWORD")  # fmt: skip


@pytest.fixture(scope="module")
def fleet() -> dict[str, dict[str, Any]]:
    return _load_compose(FLEET_FILE)["services"]


def _is_redis(service: dict[str, Any]) -> bool:
    """A Redis node or a sentinel, not a process of ours."""
    return str(service.get("image", "")).startswith("redis:")


def _role(service: dict[str, Any]) -> str | None:
    """Which process of the table a service runs (None for Redis and sentinels)."""
    command = _command(service)
    return next((name for name, rx in FLEET_COMMANDS.items() if rx.fullmatch(command)), None)


def test_every_fleet_service_runs_a_process_of_the_table(fleet):
    for name, service in fleet.items():
        assert _is_redis(service) or _role(service) is not None, (name, _command(service))


def test_each_generation_worker_of_a_fleet_host_pins_one_distinct_gpu(fleet):
    generation = {name: s for name, s in fleet.items() if _role(s) == "gpu"}
    assert len(generation) >= 2, "the fleet file shows the pattern for at least two cards"
    pinned = {}
    for name, service in generation.items():
        device = _environment(service).get("CUDA_VISIBLE_DEVICES")
        assert device is not None and re.fullmatch(r"\d+", device), (name, device)
        [reservation] = _gpu_reservations(service)
        assert reservation.get("device_ids") == [device], (name, reservation)
        node = re.search(r"-n gpu(\d+)@%h", _command(service))[1]
        assert name == f"gpu{device}" and node == device, (name, node, device)
        pinned[name] = device
    assert len(set(pinned.values())) == len(pinned), pinned


def test_every_worker_of_a_fleet_host_shares_one_required_worker_host_and_one_spool(fleet):
    with_host = {name: _environment(s).get("WORKER_HOST") for name, s in fleet.items()
                 if not _is_redis(s) and name != "flower"}  # fmt: skip
    assert set(with_host.values()) == {with_host["cpu"]}, with_host
    assert with_host["cpu"].startswith("${WORKER_HOST:?"), "WORKER_HOST must be required"
    spools = set()
    for name, service in fleet.items():
        if _role(service) in ("gpu", "cpu"):
            spool_dir = _environment(service)["SPOOL_DIR"]
            [mount] = [m for m in _mounts(service) if m["target"] == spool_dir]
            assert mount["type"] == "volume", f"{name}: the spool is this host's volume"
            spools.add((mount["source"], spool_dir))
    assert len(spools) == 1, spools


def test_a_fleet_host_runs_one_media_worker_and_the_hub_alone_runs_redis_with_aof(fleet):
    media = [name for name, s in fleet.items() if _role(s) == "cpu"]
    assert media == ["cpu"] and not fleet["cpu"].get("profiles"), media
    hub = {name for name, s in fleet.items() if "hub" in (s.get("profiles") or [])}
    assert hub == HUB_SERVICES, hub
    redis = _command(fleet["redis"])
    assert "--appendonly yes" in redis and "--requirepass ${REDIS_PASSWORD:?" in redis
    assert _environment(fleet["cpu"])["REDIS_URL"].startswith("${REDIS_URL:?")


def test_the_fleet_file_writes_no_secret(fleet):
    for name, service in fleet.items():
        env = _environment(service)
        for secret in (*SECRET_NAMES, "REDIS_URL"):
            if env.get(secret) is not None:
                assert re.fullmatch(rf"\$\{{{secret}:\?[^}}]*\}}", env[secret]), (name, secret)
        for secret in ("REDIS_PASSWORD", "REDIS_SENTINEL_PASSWORD"):  # required, or empty
            if env.get(secret) is not None:
                reference = rf"\$\{{{secret}(:\?[^}}]*|:-)\}}"
                assert re.fullmatch(reference, env[secret]), (name, secret)
    assert not re.search(r"eyJ[\w-]{10,}|sb_secret_", FLEET_FILE.read_text(encoding="utf-8"))


def test_the_sentinel_variant_adds_two_replicas_and_three_sentinels_to_the_hub_redis(fleet):
    variant = {name for name, s in fleet.items() if "sentinel" in (s.get("profiles") or [])}
    assert variant == SENTINEL_SERVICES, variant
    # Every data node may be promoted: an append-only file, the master of the day's
    # password, and (when asked) no writes while no replica is in sight
    for name in ("redis", "redis-replica1", "redis-replica2"):
        command = _command(fleet[name])
        assert "--appendonly yes" in command, name
        assert "--masterauth ${REDIS_PASSWORD:?" in command, name
        assert "--min-replicas-to-write ${REDIS_MIN_REPLICAS_TO_WRITE:-" in command, name
    for name in ("redis-replica1", "redis-replica2"):
        assert "--replicaof ${REDIS_MASTER_HOST:-redis} 6379" in _command(fleet[name]), name
    # Three sentinels with a quorum of two watch the hub's Redis, each behind its password
    ports = set()
    for name in ("sentinel1", "sentinel2", "sentinel3"):
        config = _command(fleet[name])
        assert "sentinel monitor $${REDIS_MASTER_NAME} $${REDIS_MASTER_HOST} 6379 2" in config
        assert "sentinel auth-pass $${REDIS_MASTER_NAME} $${REDIS_PASSWORD}" in config
        assert "requirepass $${REDIS_SENTINEL_PASSWORD}" in config
        assert "exec redis-server /data/sentinel.conf --sentinel" in config
        env = _environment(fleet[name])
        assert env["REDIS_MASTER_HOST"] == "${REDIS_MASTER_HOST:-redis}"
        ports |= {str(port).split(":")[0] for port in fleet[name]["ports"]}
    assert len(ports) == 3, ports


def test_every_fleet_process_can_reach_redis_through_the_sentinels(fleet):
    from worker.settings import Settings

    assert all(name.lower() in Settings.model_fields for name in SENTINEL_SETTINGS)
    for name, service in fleet.items():
        if _role(service) is None:
            continue
        env = _environment(service)
        assert all(setting in env for setting in SENTINEL_SETTINGS), name
        assert env["REDIS_SENTINELS"] == "${REDIS_SENTINELS:-}", name
