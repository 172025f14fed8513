"""PNG plots of the suite (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ..tailoring import LayerKVStats  # noqa: E402


def plot_kld(fid: dict[str, dict[str, Any]], path: Path) -> Path:
    """Mean KLD against KV bytes: a line per policy over its fractions, llama.cpp's types as
    points."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    kinds = sorted({r["kind"] for r in fid.values() if r["fraction"] is not None})
    for kind in kinds:
        rows = sorted((r for r in fid.values() if r["kind"] == kind), key=lambda r: r["kv_bytes"])
        ax.plot([r["kv_bytes"] / 2**20 for r in rows], [max(r["kld"], 1e-6) for r in rows],
                marker="o", label=kind)
    shades = iter(["black", "dimgrey", "darkgrey"])
    for name, r in fid.items():
        if r["fraction"] is None and r["kind"] != "f16":
            ax.scatter([r["kv_bytes"] / 2**20], [max(r["kld"], 1e-6)], marker="s", s=60,
                       zorder=3, color=next(shades), label=f"llama.cpp {name}")
    ax.axvline(fid["full"]["kv_bytes"] / 2**20, color="grey", ls=":", label="f16 (KLD 0)")
    ax.set_xlabel("KV memory (MiB)")
    ax.set_ylabel("mean KL divergence vs f16 cache")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def layer_stack(layers: list[LayerKVStats]) -> list[tuple[str, str, list[int]]]:
    """plot_layers' stacked bars: per state, its label, colour and tokens per KV head."""
    return [("O (f16)", "tab:green", [lay.n_o for lay in layers]),
            ("Q (4-bit)", "tab:orange", [lay.n_q for lay in layers]),
            ("S (spilled)", "tab:purple", [lay.n_s for lay in layers]),
            ("E (evicted)", "lightgrey", [lay.n_e for lay in layers])]


def plot_layers(layers: list[LayerKVStats], title: str, path: str | Path) -> Path:
    """Per-layer OQ ratio and stacked O/Q/S/E token counts (also arkv-chat's /plot)."""
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    xs = list(range(len(layers)))
    a1.bar(xs, [lay.oq_ratio for lay in layers], color="tab:blue")
    a1.set_ylabel("OQ ratio (f16 share)")
    a1.set_title(title)
    bottom = [0] * len(layers)
    for label, colour, counts in layer_stack(layers):
        a2.bar(xs, counts, bottom=bottom, label=label, color=colour)
        bottom = [b + c for b, c in zip(bottom, counts, strict=True)]
    a2.set_ylabel("tokens per KV head")
    a2.set_xlabel("layer")
    a2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
