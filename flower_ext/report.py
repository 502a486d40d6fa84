"""Run reports a risk committee can read: ``flower-ext report`` and ``flower-ext compare``.

``build_report(run_dir)`` turns ``metrics.json`` and ``audit.jsonl`` into PNG charts
and one self-contained ``report.html`` (images embedded as data URIs, no
network needed to open it). A chart appears only when its feature produced data:
no epsilon chart without DP, no rejection timeline when nobody was rejected.
A run that stopped early is reported up to its last round, with a banner saying so.
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: reports are built on servers
import matplotlib.pyplot as plt
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .audit.verify import audit_banner_html, verify_run
from .runlog import load_metrics

REJECTION_EVENTS = {
    "reply_rejected": "rejected",
    "client_missing": "missing",
    "evaluate_reply_rejected": "evaluation rejected",
    "round_skipped": "round skipped",
}


@dataclass
class Report:
    html_path: Path
    charts: dict[str, Path] = field(default_factory=dict)


def read_audit(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "audit.jsonl"
    if not path.is_file():
        return []
    events = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a truncated last line: report what came before
    return events


def _rounds(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for r in metrics.get("rounds", []) if isinstance(r, dict) and "round" in r]


def chart_auc_ks(metrics: dict[str, Any]) -> Figure | None:
    rounds = _rounds(metrics)
    points = [(r["round"], r["evaluate"].get("auc"), r["evaluate"].get("ks")) for r in rounds]
    if not any(a is not None for _, a, _ in points):
        return None
    fig, ax = plt.subplots(figsize=(7, 3.6))
    xs = [p[0] for p in points]
    ax.plot(xs, [p[1] for p in points], marker="o", label="pooled AUC")
    ax.plot(xs, [p[2] for p in points], marker="s", label="pooled KS")
    if metrics.get("centralized_auc") is not None:
        ax.axhline(metrics["centralized_auc"], color="grey", ls="--", label="centralized AUC")
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("metric")
    ax.set_title("Federated evaluation per round")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    return fig


def chart_per_bank(metrics: dict[str, Any]) -> Figure | None:
    banks = metrics.get("per_bank") or {}
    if not banks:
        return None
    names = list(banks)
    fed = [banks[b].get("federated_auc") for b in names]
    loc = [banks[b].get("local_only_auc") for b in names]
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(names)), 3.8))
    xs = range(len(names))
    width = 0.38
    ax.bar([x - width / 2 for x in xs], [v or 0 for v in loc], width, label="local-only AUC")
    ax.bar([x + width / 2 for x in xs], [v or 0 for v in fed], width, label="federated AUC")
    for x, (f, lo) in enumerate(zip(fed, loc, strict=True)):
        if f is None:
            ax.text(x, 0.02, "AUC\nundefined", ha="center", fontsize=7)
        elif lo is None:
            ax.text(x - width / 2, 0.02, "n/a", ha="center", fontsize=7)
    if metrics.get("centralized_auc") is not None:
        ax.axhline(metrics["centralized_auc"], color="grey", ls="--", label="centralized ceiling")
    ax.set_xticks(list(xs))
    ax.set_xticklabels(names, rotation=20, ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("AUC on the bank's own test split")
    ax.set_title("Is federation worth it? Local-only vs federated, per bank")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig


def chart_bytes(metrics: dict[str, Any]) -> Figure | None:
    rounds = _rounds(metrics)
    if not rounds or not any("bytes_up" in r for r in rounds):
        return None
    fig, ax = plt.subplots(figsize=(7, 3.4))
    xs = [r["round"] for r in rounds]
    ax.plot(
        xs, [r.get("bytes_up", 0) / 1e3 for r in rounds], marker="o", label="up (banks to server)"
    )
    ax.plot(xs, [r.get("bytes_down", 0) / 1e3 for r in rounds], marker="s", label="down")
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("kB (serialized messages)")
    ax.set_title("Bytes on the wire per round")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def privacy_series(metrics: dict[str, Any]) -> dict[str, list[tuple[int, float]]]:
    """Per bank, (round, epsilon spent so far) from ``rounds[i].privacy[<bank>].epsilon``."""
    series: dict[str, list[tuple[int, float]]] = {}
    for r in _rounds(metrics):
        for bank, values in (r.get("privacy") or {}).items():
            eps = values.get("epsilon") if isinstance(values, dict) else None
            if eps is not None:
                series.setdefault(bank, []).append((r["round"], float(eps)))
    return series


def chart_epsilon(metrics: dict[str, Any]) -> Figure | None:
    series = privacy_series(metrics)
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(7, 3.4))
    for bank, points in sorted(series.items()):
        ax.plot([p[0] for p in points], [p[1] for p in points], marker=".", label=bank)
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("epsilon spent (cumulative)")
    ax.set_title("Privacy budget per bank")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def rejection_rows(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for e in events:
        kind = REJECTION_EVENTS.get(str(e.get("event")))
        if kind:
            rows.append(
                {
                    "round": e.get("round"),
                    "client": e.get("label") or e.get("node_id") or "-",
                    "what": kind,
                    "reason": e.get("reason", ""),
                }
            )
    return rows


def chart_rejections(rows: list[dict[str, Any]]) -> Figure | None:
    if not rows:
        return None
    clients = sorted({str(r["client"]) for r in rows})
    kinds = sorted({r["what"] for r in rows})
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(clients) + 1.6))
    for kind, marker in zip(kinds, "oxs^D", strict=False):
        pts = [
            (r["round"] or 0, clients.index(str(r["client"]))) for r in rows if r["what"] == kind
        ]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=kind, s=50)
    ax.set_yticks(range(len(clients)))
    ax.set_yticklabels(clients, fontsize=8)
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title("Rejected, missing or failed clients")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _img_tag(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _fmt(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


CSS = """body{font-family:sans-serif;max-width:1000px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:0.9em}td,th{border:1px solid #ccc;
padding:3px 8px;text-align:left}img{max-width:100%;display:block;margin:1em 0}
.banner{background:#fde2e1;border:1px solid #d33;padding:0.8em}.ok{background:#e3f4e1;
border:1px solid #393;padding:0.8em}code{font-size:0.85em}"""


def build_report(run_dir: str | Path) -> Report:
    """Write ``report.html`` and the PNGs into ``run_dir``; returns their paths."""
    run = Path(run_dir)
    metrics = load_metrics(run)
    events = read_audit(run)
    rows = rejection_rows(events)
    figures = {
        "auc_ks": ("Pooled AUC and KS per round", chart_auc_ks(metrics)),
        "per_bank": ("Federated vs local-only AUC per bank", chart_per_bank(metrics)),
        "bytes": ("Bytes up and down per round", chart_bytes(metrics)),
        "epsilon": ("Epsilon per bank per round", chart_epsilon(metrics)),
        "rejections": ("Rejected or failed clients", chart_rejections(rows)),
    }
    report = Report(html_path=run / "report.html")
    sections: list[str] = []
    status = metrics.get("status", "unknown")
    rounds = _rounds(metrics)
    planned = metrics.get("config", {}).get("num-server-rounds")
    if status != "finished":
        last = rounds[-1]["round"] if rounds else 0
        error = metrics.get("error", "")
        sections.append(
            f'<p class="banner">This run did not finish (status: {html.escape(str(status))}). '
            f"It stopped after round {last} of {planned}."
            + (f" Error: <code>{html.escape(error)}</code>" if error else "")
            + " Everything below covers the rounds that completed.</p>"
        )
    # What was verified, item by item; a warning instead of green when anything was not.
    # The report itself is not checked here: it is being written (verify checks it later).
    sections.append(audit_banner_html(verify_run(run, check_report=False)))
    final = metrics.get("final") or {}
    summary_rows = [
        ["final pooled AUC", final.get("auc")],
        ["final pooled KS", final.get("ks")],
        ["centralized AUC (ceiling)", metrics.get("centralized_auc")],
        ["rounds completed", f"{len(rounds)} of {planned}"],
        ["total bytes up", sum(r.get("bytes_up", 0) for r in rounds)],
        ["total bytes down", sum(r.get("bytes_down", 0) for r in rounds)],
    ]
    sections.append("<h2>Summary</h2>" + _table(summary_rows, ["", "value"]))
    for name, (title, fig) in figures.items():
        if fig is None:
            continue
        path = run / f"{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        report.charts[name] = path
        sections.append(f"<h2>{html.escape(title)}</h2>{_img_tag(path, title)}")
        if name == "per_bank":
            bank_rows = [
                [b, v.get("federated_auc"), v.get("local_only_auc"), v.get("auc_null_reason")]
                for b, v in (metrics.get("per_bank") or {}).items()
            ]
            sections.append(_table(bank_rows, ["bank", "federated AUC", "local-only AUC", "note"]))
        if name == "rejections":
            sections.append(
                _table(
                    [[r["round"], r["client"], r["what"], r["reason"]] for r in rows],
                    ["round", "client", "what", "reason"],
                )
            )
    hashes = [[r["round"], r.get("model_sha256", "")] for r in rounds]
    if hashes:
        sections.append(
            "<h2>Global model per round (SHA-256)</h2>" + _table(hashes, ["round", "sha256"])
        )
    config = metrics.get("config") or {}
    sections.append("<h2>Run configuration</h2>" + _table(sorted(config.items()), ["key", "value"]))
    title = f"flower-ext run report: {run.name}"
    report.html_path.write_text(
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>"
        + "\n".join(sections)
        + "</body></html>",
        encoding="utf-8",
    )
    return report


def _config_differences(runs: list[dict[str, Any]]) -> list[str]:
    keys = sorted({k for m in runs for k in (m.get("config") or {})})
    return [
        k
        for k in keys
        if len({json.dumps((m.get("config") or {}).get(k)) for m in runs}) > 1
        and k not in ("run-name", "output-dir")
    ]


def compare_runs(run_dirs: Sequence[str | Path], png_path: str | Path) -> str:
    """A markdown table across runs (differing config keys, final metrics) and a PNG."""
    runs = [load_metrics(d) for d in run_dirs]
    names = [Path(d).name for d in run_dirs]
    differing = _config_differences(runs)
    header = ["run", *differing, "status", "final AUC", "final KS", "bytes up", "max epsilon"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for name, m in zip(names, runs, strict=True):
        rounds = _rounds(m)
        eps = [p[1] for s in privacy_series(m).values() for p in s]
        cells = [
            name,
            *[_fmt((m.get("config") or {}).get(k)) for k in differing],
            str(m.get("status")),
            _fmt((m.get("final") or {}).get("auc")),
            _fmt((m.get("final") or {}).get("ks")),
            str(sum(r.get("bytes_up", 0) for r in rounds)),
            _fmt(max(eps)) if eps else "-",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
    for name, m in zip(names, runs, strict=True):
        rounds = _rounds(m)
        ax1.plot(
            [r["round"] for r in rounds], [r["evaluate"].get("auc") for r in rounds], label=name
        )
    ax1.set_xlabel("round")
    ax1.set_ylabel("pooled AUC")
    ax1.set_title("AUC per round")
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=7)
    finals = [(m.get("final") or {}).get("auc") or 0 for m in runs]
    ax2.barh(names, finals)
    ax2.set_xlabel("final pooled AUC")
    ax2.set_xlim(min(finals) - 0.05 if finals else 0, 1)
    ax2.set_title("Final AUC")
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return "\n".join(lines)
