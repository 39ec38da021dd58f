"""cluster.settings.settings_from: the one place the server's settings meet the environment."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from cluster.settings import ENVIRONMENT, Settings, settings_from


def test_a_flag_wins_over_its_variable_and_a_variable_over_the_default() -> None:
    env = {
        "COLSHARD_ETCD": "127.0.0.1:1, 127.0.0.1:2",
        "COLSHARD_CLUSTER_NAME": "prod",
        "COLSHARD_SEAL_THRESHOLD_TOKENS": "100",
        "COLSHARD_CALIBRATION_QUERIES": "0",
        "COLSHARD_SHARD_RESOURCES": '{"colshard_shard": 1}',
    }
    s = settings_from({"cluster_name": "staging", "seal_threshold_tokens": None}, env)
    assert s.etcd_endpoints == ("127.0.0.1:1", "127.0.0.1:2")
    assert s.cluster_name == "staging"  # the flag
    assert s.shard.seal_threshold_tokens == 100 and s.shard.calibration_queries == 0
    assert s.shard_resources == {"colshard_shard": 1.0}
    assert (
        settings_from(
            {"backup_timeout_s": 60.0}, {"COLSHARD_BACKUP_TIMEOUT_S": "5"}
        ).backup_timeout_s
        == 60.0
    )
    assert settings_from({}, {"COLSHARD_BACKUP_TIMEOUT_S": "5"}).backup_timeout_s == 5.0
    hosts = {"COLSHARD_SHARD_HOSTS_PER_NODE": "3"}
    assert settings_from({}, hosts).shard_hosts_per_node == 3
    assert settings_from({"shard_hosts_per_node": 1}, hosts).shard_hosts_per_node == 1
    default = settings_from({}, {})
    assert default.cluster_name == "default" and default.etcd_endpoints == ()
    assert default.data_dir == Path("./colshard-data").resolve()
    assert default.shard == Settings().shard and default.port == Settings().port
    assert default.shard_hosts_per_node == 2 and default.rebalance_interval_s == 30.0
    off = settings_from({}, {"COLSHARD_REBALANCE_INTERVAL_S": "0"})
    assert off.rebalance_interval_s == 0.0


def test_limit_flags_are_taken_by_name() -> None:
    s = settings_from({"max_limit": 7, "max_dim": None}, {}, ("max_limit", "max_dim"))
    assert s.max_limit == 7 and s.max_dim == Settings().max_dim


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"COLSHARD_SEAL_THRESHOLD_TOKENS": "0"}, "at least 1"),
        ({"COLSHARD_INDEX_DEFER_TOKENS": "many"}, "must be an integer"),
        ({"COLSHARD_VECTORIZER_REPLICAS": "0"}, "vectorizer_replicas"),
        ({"COLSHARD_SHARD_HOSTS_PER_NODE": "0"}, "shard_hosts_per_node"),
        ({"COLSHARD_REBALANCE_INTERVAL_S": "-1"}, "rebalance_interval_s"),
        ({"COLSHARD_REBALANCE_INTERVAL_S": "often"}, "rebalance_interval_s"),
        ({"COLSHARD_SHARD_RESOURCES": "[1]"}, "JSON object"),
        ({"COLSHARD_BACKUP_TIMEOUT_S": "0"}, "backup_timeout_s must be a positive"),
        ({"COLSHARD_BACKUP_TIMEOUT_S": "soon"}, "number of seconds"),
    ],
)
def test_a_bad_value_is_a_clear_error(env: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        settings_from({}, env)


def test_every_variable_read_by_the_code_is_listed() -> None:
    root = Path(__file__).resolve().parents[2]
    used: set[str] = set()
    for package in ("cluster", "coordinator", "shard", "gateway"):
        for path in (root / package).rglob("*.py"):
            used.update(re.findall(r'"(COLSHARD_[A-Z_]+)"', path.read_text()))
    assert len(used) >= 10 and used - set(ENVIRONMENT) == set()
