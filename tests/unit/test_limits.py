"""The request limits (cluster/limits.py) as pure functions."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from cluster import limits
from cluster.errors import InvalidInput, PayloadTooLarge
from cluster.filters import parse_filter
from cluster.settings import Settings
from cluster.spec import CollectionSpec
from cluster.validation import ObjectInput

SETTINGS = Settings(
    max_batch_objects=3,
    max_tokens_per_object=8,
    max_query_tokens=4,
    max_dim=16,
    max_limit=50,
    max_filter_depth=3,
    max_filter_nodes=10,
    max_shards=4,
)
SPEC = CollectionSpec.from_dict(
    {
        "name": "C",
        "properties": [{"name": "year", "data_type": "int"}],
        "vectors": [{"name": "mv", "dim": 4}],
    }
)


def nest(depth: int) -> dict[str, Any]:
    node: dict[str, Any] = {"path": "year", "operator": "equal", "value": 1}
    for _ in range(depth - 1):
        node = {"operator": "not", "operands": [node]}
    return node


def code(fn: Any, *args: Any) -> str | None:
    try:
        fn(*args)
    except (InvalidInput, PayloadTooLarge) as exc:
        return str(exc.details["limit"])
    return None


@pytest.mark.parametrize("depth", [1, 2, 3, 4, 5])
def test_filter_depth_counts_like_the_parser(depth: int) -> None:
    """The structural check and cluster.filters agree on what depth means."""
    try:
        parse_filter(nest(depth), SPEC, max_depth=3)
        parser_ok = True
    except InvalidInput:
        parser_ok = False
    assert (code(limits.check_filter, nest(depth), SETTINGS) is None) == parser_ok


def test_filter_nodes_count_operands_and_list_values() -> None:
    wide = {"operator": "or", "operands": [nest(1)] * 9}
    assert code(limits.check_filter, wide, SETTINGS) is None  # 10 nodes
    wider = {"operator": "or", "operands": [nest(1)] * 10}
    assert code(limits.check_filter, wider, SETTINGS) == "max_filter_nodes"
    values = {"path": "year", "operator": "contains_any", "value": list(range(10))}
    assert code(limits.check_filter, values, SETTINGS) == "max_filter_nodes"
    for junk in (None, 3, "x", [], {"operands": "no"}):
        assert code(limits.check_filter, junk, SETTINGS) is None  # the parser judges these


def test_matrix_limits() -> None:
    def check(value: Any, what: str = "v") -> str | None:
        return code(lambda: limits.check_matrix(value, what, max_tokens=8, max_dim=16))

    assert check(np.zeros((8, 16))) is None
    assert check(np.zeros((9, 4))) == "tokens"
    assert check(np.zeros((2, 17))) == "max_dim"
    assert check(np.zeros(17)) == "max_dim"
    assert check([[1.0, 2.0], [3.0]]) is None  # ragged: the structural check reports it
    assert check(None) is None and check(3.0) is None
    assert (
        code(lambda: limits.check_matrix(np.zeros((10**5, 2)), "v", max_tokens=0, max_dim=16))
        is None
    )  # 0: no token limit


def test_object_batch_query_page_and_collection_limits() -> None:
    obj = ObjectInput(None, {}, {"mv": np.zeros((2, 4))})
    assert code(limits.check_objects, [obj] * 3, SETTINGS) is None
    assert code(limits.check_objects, [obj] * 4, SETTINGS) == "max_batch_objects"
    big = ObjectInput(None, {}, {"mv": np.zeros((9, 4))})
    assert code(limits.check_objects, [obj, big], SETTINGS) == "tokens"
    assert code(limits.check_query_vector, np.zeros((5, 4)), "q", SETTINGS) == "tokens"
    assert code(limits.check_page, 50, 50, SETTINGS) is None
    assert code(limits.check_page, 51, 0, SETTINGS) == "max_limit"
    assert code(limits.check_page, 0, 0, SETTINGS) == "max_limit"
    assert code(limits.check_page, 1, -1, SETTINGS) == "max_limit"
    assert code(limits.check_collection, {"shard_count": 5}, SETTINGS) == "max_shards"
    assert (
        code(limits.check_collection, {"vectors": [{"name": "a", "dim": 17}]}, SETTINGS)
        == "max_dim"
    )
    assert (
        code(limits.check_collection, {"shard_count": 4, "vectors": [{"dim": 16}, "x"]}, SETTINGS)
        is None
    )


def test_every_limit_has_a_cli_flag() -> None:
    from gateway.cli import build_parser, settings_from_args

    args = build_parser().parse_args(
        [
            "gateway",
            "--max-dim",
            "64",
            "--max-filter-depth",
            "4",
            "--max-filter-nodes",
            "9",
            "--max-shards",
            "3",
            "--max-collections",
            "5",
            "--max-query-tokens",
            "7",
            "--max-tokens-per-object",
            "0",
        ]
    )
    s = settings_from_args(args)
    assert (
        s.max_dim,
        s.max_filter_depth,
        s.max_filter_nodes,
        s.max_shards,
        s.max_query_tokens,
        s.max_tokens_per_object,
    ) == (64, 4, 9, 3, 7, 0)
    assert s.max_collections == 5


def test_shard_engine_flags_and_env(monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway.cli import build_parser, settings_from_args

    parse = build_parser().parse_args
    default = settings_from_args(parse(["gateway"])).shard
    assert default.index_defer_tokens == 1_048_576
    s = settings_from_args(
        parse(["gateway", "--index-defer-tokens", "0", "--seal-threshold-tokens", "4096"])
    ).shard
    assert (s.index_defer_tokens, s.seal_threshold_tokens) == (0, 4096)
    monkeypatch.setenv("COLSHARD_INDEX_DEFER_TOKENS", "5000")
    assert settings_from_args(parse(["gateway"])).shard.index_defer_tokens == 5000
    assert (
        settings_from_args(parse(["gateway", "--index-defer-tokens", "7"])).shard.index_defer_tokens
        == 7
    )  # the flag wins
    with pytest.raises(SystemExit):
        parse(["gateway", "--index-defer-tokens", "-1"])


def test_calibration_queries_flag_and_env(monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway.cli import build_parser, settings_from_args

    parse = build_parser().parse_args
    assert settings_from_args(parse(["serve"])).shard.calibration_queries == 128
    assert (
        settings_from_args(parse(["serve", "--calibration-queries", "0"])).shard.calibration_queries
        == 0
    )
    monkeypatch.setenv("COLSHARD_CALIBRATION_QUERIES", "64")
    assert settings_from_args(parse(["gateway"])).shard.calibration_queries == 64
    with pytest.raises(SystemExit):
        parse(["serve", "--calibration-queries", "-3"])


def test_every_command_prints_its_help() -> None:
    """A help text with a stray ``%`` only fails when it is formatted: format every one."""
    import argparse

    from gateway.cli import build_parser

    def commands(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
        found = [parser]
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for command in action.choices.values():
                    found += commands(command)
        return found

    every = commands(build_parser())
    assert len(every) >= 10
    for command in every:
        assert command.format_help(), command.prog
