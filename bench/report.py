"""Turning a result document into a summary (ratios, targets), a table, JSON and a PNG plot."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from bench.harness import RECALL_BAR

# The benchmark issue's targets. "size" says which corpus a target is defined on; on other
# sizes it is still computed, marked informational.
TARGETS: tuple[dict[str, Any], ...] = (
    {"name": "engine recall@10 ≥ 0.95", "size": "small,medium"},
    {"name": "engine QPS ≥ 3× best faiss (recall@10 ≥ 0.90)", "size": "small"},
    {"name": "engine QPS ≥ 30", "size": "medium"},
    {"name": "HTTP adds ≤ 3 ms p50", "size": "small,medium"},
    {"name": "index build no slower than faiss IVF", "size": "small,medium"},
    {"name": "≤ 36 bytes/token resident for the candidate index", "size": "small,medium"},
)


def _first(results: list[dict[str, Any]], family: str) -> dict[str, Any] | None:
    for r in results:
        if r.get("family") == family and "error" not in r and "skipped" not in r:
            return r
    return None


def _ok(r: dict[str, Any]) -> bool:
    return "error" not in r and "skipped" not in r and r.get("qps_1") is not None


def _ratio(a: Any, b: Any) -> float | None:
    if a is None or b is None or not b:
        return None
    return float(a) / float(b)


def summarize(doc: dict[str, Any]) -> dict[str, Any]:
    results: list[dict[str, Any]] = doc["results"]
    size = str(doc.get("config", {}).get("size", ""))
    engine = _first(results, "colshard")
    http = _first(results, "colshard-http")
    brute = _first(results, "bruteforce")
    faiss = [r for r in results if str(r.get("family", "")).startswith("faiss-") and _ok(r)]
    eligible = [r for r in faiss if r["recall_at_10"] >= RECALL_BAR]
    best = max(eligible, key=lambda r: r["qps_1"]) if eligible else None
    ivf_build = next((r["build_s"] for r in faiss if r["family"] == "faiss-ivf"), None)
    summary: dict[str, Any] = {
        "best_faiss": None
        if best is None
        else {
            k: best.get(k)
            for k in (
                "pipeline",
                "recall_at_10",
                "qps_1",
                "qps_2",
                "p50_ms",
                "candidates_mean",
                "build_s",
            )
        },
        "faiss_ivf_build_s": ivf_build,
        "skipped": {r["pipeline"]: r["skipped"] for r in results if "skipped" in r},
        "errors": {r["pipeline"]: r["error"] for r in results if "error" in r},
    }
    ratios: dict[str, Any] = {}
    if engine is not None:
        if best is not None:
            ratios["engine_qps_vs_best_faiss"] = _ratio(engine.get("qps_1"), best["qps_1"])
            ratios["engine_qps2_vs_best_faiss_qps2"] = _ratio(
                engine.get("qps_2"), best.get("qps_2")
            )
            ratios["engine_candidates_vs_best_faiss"] = _ratio(
                engine.get("candidates_mean"), best["candidates_mean"]
            )
        # Equal-recall comparison: the fastest faiss setting at least as accurate as the engine.
        er = engine.get("recall_at_10")
        matched = [r for r in faiss if er is not None and r["recall_at_10"] >= er]
        if matched:
            m = max(matched, key=lambda r: r["qps_1"])
            summary["faiss_at_engine_recall"] = {
                k: m.get(k) for k in ("pipeline", "recall_at_10", "qps_1", "candidates_mean")
            }
            ratios["engine_qps_vs_faiss_at_same_recall"] = _ratio(engine.get("qps_1"), m["qps_1"])
        if brute is not None:
            ratios["engine_qps_vs_bruteforce"] = _ratio(engine.get("qps_1"), brute["qps_1"])
        # No token index at all (a corpus below the seal threshold): nothing to compare.
        if engine.get("index_disk_bytes_per_token", 1.0):
            ratios["engine_build_vs_faiss_ivf"] = _ratio(engine.get("build_s"), ivf_build)
        else:
            summary["engine_note"] = "the engine built no token index: every search was exact"
    if http is not None and engine is not None:
        ratios["http_p50_overhead_ms"] = http["p50_ms"] - engine["p50_ms"]
        engine_shards = int(engine.get("params", {}).get("shards", 1))
        http_shards = int(http.get("params", {}).get("shard_count", 2))
        if engine_shards != http_shards:
            summary["http_note"] = (
                f"HTTP collection has {http_shards} shards, the in-process engine "
                f"{engine_shards}: rerun with --engine-shards {http_shards} for a like-for-like "
                "overhead"
            )
        server_ms = (http.get("phase_ms") or {}).get("server")
        if server_ms is not None:  # coordinator's own time (took_ms): the rest is HTTP + JSON
            ratios["http_outside_coordinator_ms"] = http["mean_ms"] - server_ms
    summary["ratios"] = ratios
    summary["targets"] = _targets(size, engine, ratios)
    explain = {
        r["pipeline"]: {
            k: r["explain"][k]
            for k in (
                "p50_ms_off",
                "p50_ms_on",
                "overhead_p50_ms",
                "hits_checked",
                "score_mismatches",
            )
        }
        for r in results
        if r.get("explain")
        and "error" not in r
        and "skipped" not in r
        and "error" not in r["explain"]
    }
    if explain:
        summary["explain"] = explain
    muvera = [
        r for r in results if str(r.get("family", "")).startswith("colshard-muvera") and _ok(r)
    ]
    if muvera:
        summary["muvera"] = _muvera_summary(muvera, engine, best)
    return summary


def _muvera_summary(
    rows: list[dict[str, Any]], engine: dict[str, Any] | None, best: dict[str, Any] | None
) -> dict[str, Any]:
    """The muvera engine run(s) next to the ScaNN engine and the best faiss setting."""
    main = next((r for r in rows if r.get("family") == "colshard-muvera"), rows[0])
    out: dict[str, Any] = {
        "settings": [
            {
                k: r.get(k)
                for k in (
                    "pipeline",
                    "recall_at_10",
                    "recall_at_100",
                    "qps_1",
                    "p50_ms",
                    "candidates_mean",
                )
            }
            for r in rows
        ],
        "index_bytes_per_token": main.get("index_bytes_per_token"),
        "build_s": main.get("build_s"),
    }
    if engine is not None:
        out["qps_vs_scann_engine"] = _ratio(main.get("qps_1"), engine.get("qps_1"))
        out["index_bytes_vs_scann_engine"] = _ratio(
            main.get("index_bytes_per_token"), engine.get("index_bytes_per_token")
        )
        out["build_vs_scann_engine"] = _ratio(main.get("build_s"), engine.get("build_s"))
        er = engine.get("recall_at_10")
        matched = [r for r in rows if er is not None and r["recall_at_10"] >= er]
        if matched:  # the fastest muvera setting at least as accurate as the ScaNN engine
            m = max(matched, key=lambda r: r["qps_1"])
            out["at_scann_recall"] = {k: m.get(k) for k in ("pipeline", "recall_at_10", "qps_1")}
    if best is not None:
        out["qps_vs_best_faiss"] = _ratio(main.get("qps_1"), best["qps_1"])
    return out


def _targets(
    size: str, engine: dict[str, Any] | None, ratios: dict[str, Any]
) -> list[dict[str, Any]]:
    e = engine or {}
    values: list[tuple[Any, float, str]] = [
        (e.get("recall_at_10"), 0.95, ">="),
        (ratios.get("engine_qps_vs_best_faiss"), 3.0, ">="),
        (e.get("qps_1"), 30.0, ">="),
        (ratios.get("http_p50_overhead_ms"), 3.0, "<="),
        (ratios.get("engine_build_vs_faiss_ivf"), 1.0, "<="),
        (
            e.get("index_bytes_per_token") if e.get("index_disk_bytes_per_token", 1.0) else None,
            36.0,
            "<=",
        ),
    ]
    out = []
    for target, (value, bound, op) in zip(TARGETS, values, strict=True):
        passed = None if value is None else (value >= bound if op == ">=" else value <= bound)
        out.append(
            {
                "target": target["name"],
                "value": value,
                "pass": passed,
                "applies": size in target["size"].split(","),
            }
        )
    return out


# ---------------------------------------------------------------------------------------------
# table

_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("pipeline", "pipeline", "s"),
    ("recall_at_10", "R@10", ".3f"),
    ("recall_at_100", "R@100", ".3f"),
    ("qps_1", "QPS", ".1f"),
    ("p50_ms", "p50 ms", ".1f"),
    ("p99_ms", "p99 ms", ".1f"),
    ("qps_2", "QPS 2cl", ".1f"),
    ("candidates_mean", "cand/q", ".0f"),
    ("build_s", "build s", ".1f"),
    ("index_bytes_per_token", "idx B/tok", ".1f"),
    ("disk_bytes_per_token", "disk B/tok", ".0f"),
    ("peak_rss_mb", "peak RSS MB", ".0f"),
    ("import_tokens_per_s", "import tok/s", ".0f"),
)


def _fmt(value: Any, spec: str) -> str:
    if value is None:
        return "-"
    if spec == "s":
        return str(value)
    if isinstance(value, float) and math.isnan(value):
        return "-"
    return format(value, spec)


def format_table(doc: dict[str, Any]) -> str:
    rows = [[h for _, h, _ in _COLUMNS]]
    notes: list[str] = []
    for r in doc["results"]:
        if "skipped" in r or "error" in r:
            notes.append(
                f"{r['pipeline']}: "
                + (f"skipped ({r['skipped']})" if "skipped" in r else f"error: {r['error']}")
            )
            continue
        rows.append([_fmt(r.get(key), spec) for key, _, spec in _COLUMNS])
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    lines = [
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    ds = doc.get("dataset", {})
    head = (
        f"dataset {ds.get('key')}: {ds.get('n_docs')} docs, {ds.get('n_tokens')} tokens, "
        f"dim {ds.get('dim')}, {ds.get('n_queries')} queries; "
        f"threads/client {doc.get('config', {}).get('threads')}"
    )
    out = [head, *lines]
    summary = doc.get("summary") or {}
    best = summary.get("best_faiss")
    out.append("")
    out.append(
        "best faiss with recall@10 ≥ 0.90: "
        + (
            f"{best['pipeline']} ({best['qps_1']:.1f} QPS, recall {best['recall_at_10']:.3f})"
            if best
            else "none"
        )
    )
    for name, value in (summary.get("ratios") or {}).items():
        out.append(f"  {name}: {_fmt(value, '.2f')}")
    for key in ("http_note", "engine_note"):
        if summary.get(key):
            out.append(f"  note: {summary[key]}")
    mv = summary.get("muvera")
    if mv:
        out.append(
            f"muvera: {_fmt(mv.get('index_bytes_per_token'), '.1f')} index bytes/token, "
            f"build {_fmt(mv.get('build_s'), '.1f')} s"
        )
        for key in (
            "qps_vs_scann_engine",
            "qps_vs_best_faiss",
            "index_bytes_vs_scann_engine",
            "build_vs_scann_engine",
        ):
            if mv.get(key) is not None:
                out.append(f"  muvera_{key}: {_fmt(mv[key], '.2f')}")
        if mv.get("at_scann_recall"):
            m = mv["at_scann_recall"]
            out.append(
                f"  fastest muvera setting at the ScaNN engine's recall@10: "
                f"{m['pipeline']} ({m['qps_1']:.1f} QPS, {m['recall_at_10']:.3f})"
            )
    out += _explain_lines(doc["results"])
    for t in summary.get("targets", []):
        mark = {True: "PASS", False: "FAIL", None: "n/a "}[t["pass"]]
        scope = "" if t["applies"] else "  (informational on this size)"
        out.append(f"  [{mark}] {t['target']}: {_fmt(t['value'], '.3g')}{scope}")
    out += notes
    return "\n".join(out)


def _explain_lines(results: list[dict[str, Any]]) -> list[str]:
    """Per pipeline with an explain measurement: latency off → on, the score check, and the
    example's first query tokens (query token → matched document token position, similarity)."""
    out: list[str] = []
    for r in results:
        e = r.get("explain")
        if not e or "skipped" in r or "error" in r:
            continue
        if "error" in e:
            out.append(f"explain ({r['pipeline']}): error: {e['error']}")
            continue
        out.append(
            f"explain ({r['pipeline']}): p50 {e['p50_ms_off']:.1f} ms off → "
            f"{e['p50_ms_on']:.1f} ms on ({e['overhead_p50_ms']:+.1f} ms); token sims "
            f"sum to the score for {e['hits_checked'] - e['score_mismatches']}/"
            f"{e['hits_checked']} hits ({e['score_mismatches']} mismatches, max "
            f"|diff| {e['max_abs_score_diff']:.1e})"
        )
        ex = e.get("example")
        if ex:
            tokens = ", ".join(
                f"q{t['query_token']}→d{t['doc_token']} {t['sim']:.3f}" for t in ex["tokens"]
            )
            out.append(
                f"  e.g. query {ex['query']}, top hit doc {ex['doc']} (score "
                f"{ex['score']:.3f}, {ex['n_query_tokens']} query tokens): {tokens}, ..."
            )
    return out


# ---------------------------------------------------------------------------------------------
# files


def write_json(doc: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1, sort_keys=False, default=str))
    return path


def plot(doc: dict[str, Any], path: Path) -> Path:
    """QPS (log) against recall@10: one line per faiss index kind, points for the rest."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=110)
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in doc["results"]:
        if _ok(r) and r.get("recall_at_10") is not None:
            groups.setdefault(str(r.get("family")), []).append(r)
    if "colshard-sweep" in groups and "colshard" in groups:
        # One curve: the default setting is a point of the k' sweep.
        merged = groups.pop("colshard-sweep") + groups["colshard"]
        groups["colshard"] = sorted(
            merged, key=lambda r: r.get("params", {}).get("candidates_per_token", 0)
        )
    if "colshard-muvera-sweep" in groups and "colshard-muvera" in groups:
        merged = groups.pop("colshard-muvera-sweep") + groups["colshard-muvera"]
        groups["colshard-muvera"] = sorted(
            merged, key=lambda r: r.get("params", {}).get("candidates", 0)
        )
    styles = {
        "faiss-hnsw": ("tab:blue", "o-"),
        "faiss-ivf": ("tab:green", "s-"),
        "bruteforce": ("black", "x"),
        "colshard": ("tab:red", "*--"),
        "colshard-sweep": ("tab:red", "*--"),
        "colshard-http": ("tab:purple", "D"),
        "colshard-muvera": ("tab:orange", "P--"),
        "colshard-muvera-sweep": ("tab:orange", "P--"),
    }
    for family, rs in groups.items():
        # Sweeps are listed cheap → expensive: connect them in that order.
        color, style = styles.get(family, ("gray", "^"))
        ax.plot(
            [r["recall_at_10"] for r in rs],
            [r["qps_1"] for r in rs],
            style,
            color=color,
            label=family,
            markersize=12 if "*" in style else 6,
        )
        for r in rs:
            if family.startswith("faiss"):
                label = str(r["pipeline"]).split(" ", 1)[-1]
            elif family.startswith("colshard-muvera") and "candidates" in r.get("params", {}):
                label = f"C{r['params']['candidates']}"
            elif family.startswith("colshard") and "candidates_per_token" in r.get("params", {}):
                suffix = str(r["pipeline"]).rsplit(" ", 1)[-1]
                label = (
                    suffix
                    if suffix.startswith("k'")
                    else f"k'{r['params']['candidates_per_token']}"
                )
            else:
                continue
            ax.annotate(
                label,
                (r["recall_at_10"], r["qps_1"]),
                fontsize=7,
                xytext=(3, 3),
                textcoords="offset points",
            )
    ax.axvline(RECALL_BAR, color="gray", lw=0.8, ls=":")
    recalls = [r["recall_at_10"] for rs in groups.values() for r in rs]
    if recalls:
        ax.set_xlim(min(min(recalls), RECALL_BAR) - 0.02, 1.005)
    ax.set_yscale("log")
    ax.set_xlabel("recall@10 vs exact MaxSim")
    ax.set_ylabel("queries per second (1 client, log)")
    ds = doc.get("dataset", {})
    ax.set_title(
        f"{ds.get('key')} — {ds.get('n_docs')} docs, {ds.get('n_tokens')} tokens", fontsize=9
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_all(doc: dict[str, Any], out_dir: Path, make_plot: bool = True) -> dict[str, Path]:
    """results.json, results.txt (the table) and qps_recall.png under ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"json": write_json(doc, out_dir / "results.json")}
    table = out_dir / "results.txt"
    table.write_text(format_table(doc) + "\n")
    files["table"] = table
    if make_plot:
        try:
            files["plot"] = plot(doc, out_dir / "qps_recall.png")
        except ImportError as exc:
            doc.setdefault("summary", {})["plot_error"] = f"matplotlib missing: {exc}"
    return files


# The recall-calibration targets (issue #17), checked per corpus of a suite.
SUITE_RECALL_SLACK = 0.005
SUITE_VS_EXACT = 10.0


def suite_row(doc: dict[str, Any]) -> dict[str, Any]:
    """One corpus of a suite: the engine's recall@10 and QPS (as calibrated, and on the
    synthetic calibration alone), the target, faiss IVF at its best, numpy exact."""
    results: list[dict[str, Any]] = doc["results"]
    engine = _first(results, "colshard")
    synthetic = _first(results, "colshard-calibration")
    http = _first(results, "colshard-http")
    brute = _first(results, "bruteforce")
    faiss = [r for r in results if str(r.get("family", "")).startswith("faiss-") and _ok(r)]
    best = max(faiss, key=lambda r: (r["recall_at_10"] >= RECALL_BAR, r["qps_1"]), default=None)
    target = 0.95
    cal = (engine or {}).get("calibration_warm") or (engine or {}).get("calibration") or {}
    shards = cal.get("shards") or [{}]
    first_cal = (engine or {}).get("calibration") or {}
    row: dict[str, Any] = {
        "dataset": doc["dataset"]["key"].split("/")[0],
        "n_tokens": doc["dataset"]["n_tokens"],
        "dim": doc["dataset"]["dim"],
        "target": target,
        "engine_r10": (engine or {}).get("recall_at_10"),
        "engine_qps": (engine or {}).get("qps_1"),
        "depth": [s.get("v", {}).get("depth") for s in shards],
        "synthetic_r10": (synthetic or {}).get("recall_at_10"),
        "synthetic_qps": (synthetic or {}).get("qps_1"),
        "calibration_cpu_s": first_cal.get("cpu_s"),
        "http_r10": (http or {}).get("recall_at_10"),
        "http_qps": (http or {}).get("qps_1"),
        "faiss": None if best is None else best["pipeline"],
        "faiss_r10": None if best is None else best["recall_at_10"],
        "faiss_qps": None if best is None else best["qps_1"],
        "exact_qps": (brute or {}).get("qps_1"),
    }
    row["vs_exact"] = _ratio(row["engine_qps"], row["exact_qps"])
    row["vs_faiss"] = _ratio(row["engine_qps"], row["faiss_qps"])
    rec = [r for r in (row["engine_r10"], row["synthetic_r10"], row["http_r10"]) if r is not None]
    row["recall_ok"] = bool(rec) and min(rec) >= target - SUITE_RECALL_SLACK
    row["speed_ok"] = row["vs_exact"] is not None and row["vs_exact"] >= SUITE_VS_EXACT
    return row


def format_suite(rows: list[dict[str, Any]]) -> str:
    head = (
        f"{'dataset':<22} {'tokens':>9} {'dim':>4}  {'R@10':>5} {'QPS':>6} {'depth':>9}  "
        f"{'synth R@10':>10} {'QPS':>6}  {'HTTP R@10':>9} {'QPS':>6}  {'faiss IVF R@10':>14}"
        f" {'QPS':>6}  {'exact QPS':>9}  {'×exact':>6} {'×faiss':>6}  targets"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        depth = ",".join(f"{d:g}" for d in r["depth"] if d is not None) or "-"
        ok = (
            "recall "
            + ("PASS" if r["recall_ok"] else "FAIL")
            + ", ≥10× exact "
            + ("PASS" if r["speed_ok"] else "FAIL")
        )
        lines.append(
            f"{r['dataset']:<22} {r['n_tokens']:>9} {r['dim']:>4}"
            f"  {_fmt(r['engine_r10'], '.3f'):>5} {_fmt(r['engine_qps'], '.1f'):>6} {depth:>9}"
            f"  {_fmt(r['synthetic_r10'], '.3f'):>10}"
            f" {_fmt(r['synthetic_qps'], '.1f'):>6}  {_fmt(r['http_r10'], '.3f'):>9}"
            f" {_fmt(r['http_qps'], '.1f'):>6}  {_fmt(r['faiss_r10'], '.3f'):>14}"
            f" {_fmt(r['faiss_qps'], '.1f'):>6}  {_fmt(r['exact_qps'], '.1f'):>9}"
            f"  {_fmt(r['vs_exact'], '.1f'):>6} {_fmt(r['vs_faiss'], '.2f'):>6}  {ok}"
        )
    return "\n".join(lines)
