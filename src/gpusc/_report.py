"""report.html of ``gpusc run``: one self-contained page (inline CSS, PNG images as base64
data URIs, no script, nothing fetched over the network).

Sections, each a ``<section id=...>``: ``summary`` (input, device, totals), ``steps`` (the
per-step table), ``qc`` (violins of the QC metrics before filtering, with the filter
thresholds), ``hvg`` (mean against dispersion, as scanpy's plot), ``pca`` (variance ratio),
``umap`` (coloured by the Leiden clusters and by the given obs columns), ``markers`` (top
genes per cluster from ``tl.rank_genes_groups``). A section whose step did not run says so.
The figures redraw scanpy's with matplotlib alone, and :func:`adjusted_rand_index` stands in
for scikit-learn's: importing scanpy or scikit-learn would cost ``gpusc run`` 1-1.5 s.

:class:`Snapshots` keeps what the later steps remove (the QC metrics of the cells and genes
that filtering drops, the HVG statistics of the genes the subset drops).
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import numpy as np

SECTIONS = ("summary", "steps", "qc", "hvg", "pca", "umap", "markers")
N_MARKERS = 5
MAX_POINTS = 4000  # jittered points drawn over each violin (a seeded subsample)
DPI = 90
HVG_COLUMNS = ("means", "dispersions", "dispersions_norm", "variances", "variances_norm", "highly_variable")


class Snapshots:
    """Columns the report needs, taken right after the step that writes them."""

    def __init__(self) -> None:
        self.cell_qc = None  # obs QC metrics of every cell, before filter_cells
        self.gene_qc = None  # var n_cells_by_counts of every gene, before filter_genes
        self.hvg = None  # var HVG statistics of every gene, before the subset

    def after(self, step: str, adata) -> None:
        if step == "calculate_qc_metrics":
            columns = [c for c in adata.obs.columns  # the QC variables' percentages, not the top-N ones
                       if c in ("n_genes_by_counts", "total_counts")
                       or (c.startswith("pct_counts_") and not c.startswith("pct_counts_in_top_"))]
            self.cell_qc = adata.obs[columns].copy()
            self.gene_qc = adata.var[["n_cells_by_counts"]].copy()
        elif step == "highly_variable_genes":
            self.hvg = adata.var[[c for c in HVG_COLUMNS if c in adata.var.columns]].copy()


# ---------------------------------------------------------------- ARI


def adjusted_rand_index(labels_a, labels_b) -> float:
    """Adjusted Rand index of two labelings of the same cells (as scikit-learn's
    ``adjusted_rand_score``, without importing it).

    Hubert and Arabie's formula on the pairs of cells: the pairs together in both labelings
    (a sum over the contingency table), against the pairs expected together by chance, scaled
    by the largest possible value. 1.0 where that scale is 0 (both labelings one cluster, or
    every cell its own cluster; also fewer than two cells), as scikit-learn.

    Parameters
    ----------
    labels_a, labels_b
        One label per cell, any hashable values (strings, integers, categories); no missing values.

    Returns
    -------
    float
        1.0 for the same partition (under any names), about 0 for unrelated ones, down to -0.5.
    """
    import pandas as pd

    codes_a, _ = pd.factorize(np.asarray(labels_a).ravel())
    codes_b, classes_b = pd.factorize(np.asarray(labels_b).ravel())
    if codes_a.size != codes_b.size:
        raise ValueError(f"labels_a and labels_b have {codes_a.size} and {codes_b.size} labels; "
                         "they must label the same cells")
    if (codes_a < 0).any() or (codes_b < 0).any():
        raise ValueError("labels_a and labels_b must not hold missing values (drop those cells first)")

    def pairs(counts: np.ndarray) -> int:  # n * (n - 1) / 2 of each count, summed, exactly
        counts = counts.astype(np.int64)
        return int((counts * (counts - 1) // 2).sum())

    # only the non-zero cells of the contingency table: one key per (class of a, class of b)
    _, together = np.unique(codes_a.astype(np.int64) * len(classes_b) + codes_b, return_counts=True)
    index = pairs(together)
    pairs_a, pairs_b = pairs(np.bincount(codes_a)), pairs(np.bincount(codes_b))
    n_pairs = codes_a.size * (codes_a.size - 1) // 2
    expected = pairs_a * pairs_b / n_pairs if n_pairs else 0.0
    largest = (pairs_a + pairs_b) / 2
    if largest == expected:  # only when both are one cluster or both all singletons
        return 1.0
    return float((index - expected) / (largest - expected))


# ---------------------------------------------------------------- figures


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def png_bytes(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    _pyplot().close(fig)
    return buffer.getvalue()


def _violin(ax, values: np.ndarray, title: str, rng, *, threshold=None, threshold_label="", log=False):
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    shown = np.log10(values + 1) if log else values
    if shown.size and np.ptp(shown) > 0:
        parts = ax.violinplot(shown, showextrema=False)
        for body in parts["bodies"]:
            body.set_alpha(0.5)
    points = shown if shown.size <= MAX_POINTS else rng.choice(shown, MAX_POINTS, replace=False)
    ax.scatter(1 + rng.uniform(-0.2, 0.2, points.size), points, s=1, c="black", alpha=0.3, rasterized=True)
    if threshold is not None:
        y = np.log10(threshold + 1) if log else threshold
        ax.axhline(y, color="tab:red", lw=1.2)
        ax.text(1.45, y, f" {threshold_label}", color="tab:red", va="bottom", ha="right", fontsize=8)
    ax.set_xticks([])
    ax.set_title(title + (" (log10(x+1))" if log else ""), fontsize=9)


def qc_figure(snap: Snapshots, min_genes: int, min_cells: int) -> bytes:
    plt = _pyplot()
    rng = np.random.default_rng(0)
    cells = snap.cell_qc
    panels = [c for c in ("n_genes_by_counts", "total_counts") if c in cells.columns]
    panels += [c for c in cells.columns if c.startswith("pct_counts_")]
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(2.6 * (len(panels) + 1), 3.4))
    for ax, column in zip(axes, panels, strict=False):
        threshold = min_genes if column == "n_genes_by_counts" else None
        _violin(ax, cells[column].to_numpy(), f"cells: {column}", rng, threshold=threshold,
                threshold_label=f"min_genes={min_genes}")
    _violin(axes[-1], snap.gene_qc["n_cells_by_counts"].to_numpy(), "genes: n_cells_by_counts", rng,
            threshold=min_cells, threshold_label=f"min_cells={min_cells}", log=True)
    fig.tight_layout()
    return png_bytes(fig)


def hvg_figure(hvg) -> bytes:
    """scanpy's ``pl.highly_variable_genes`` drawn with matplotlib from the saved var columns.

    Two panels, normalized then not normalized dispersion (``seurat``, ``cell_ranger``) or
    variance (``seurat_v3``: when ``variances_norm`` is there, as scanpy decides) against the
    mean; highly variable genes black, the others grey; scanpy's axis labels.
    """
    plt = _pyplot()
    seurat_v3 = "variances_norm" in hvg.columns
    data_type = "variances" if seurat_v3 else "dispersions"
    columns = [f"{data_type}_norm", data_type]
    missing = [c for c in ("means", *columns, "highly_variable") if c not in hvg.columns]
    if missing:
        raise ValueError(f"hvg_figure needs var columns {missing} (pp.highly_variable_genes writes them)")
    means = hvg["means"].to_numpy(dtype=np.float64)
    highly_variable = hvg["highly_variable"].to_numpy(dtype=bool)
    width, height = plt.rcParams["figure.figsize"]
    fig, axes = plt.subplots(1, 2, figsize=(2 * width, height))
    fig.subplots_adjust(wspace=0.3)
    for ax, column, normalized in zip(axes, columns, ("", "not "), strict=True):
        values = hvg[column].to_numpy(dtype=np.float64)
        for label, color, mask in (("highly variable genes", "black", highly_variable),
                                   ("other genes", "grey", ~highly_variable)):
            ax.scatter(means[mask], values[mask], label=label, c=color, s=1)
        ax.set_xlabel("mean expressions of genes")
        ax.set_ylabel(f"{data_type} of genes ({normalized}normalized)")
    axes[0].legend()
    return png_bytes(fig)


def pca_figure(variance_ratio: np.ndarray) -> bytes:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.4))
    ranks = np.arange(1, variance_ratio.size + 1)
    ax.plot(ranks, variance_ratio, "o", ms=3)
    ax.set_yscale("log")
    ax.set_xlabel("principal component")
    ax.set_ylabel("variance ratio")
    ax.set_title(f"{variance_ratio.size} components: {variance_ratio.sum():.1%} of the variance", fontsize=9)
    fig.tight_layout()
    return png_bytes(fig)


def _default_20() -> list[str]:
    """scanpy's ``default_20``: matplotlib's tab20 darks then lights without the greys, with
    scanpy's colour-blind replacements (green, purple, khaki) and two added reds/browns."""
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    tab20 = [to_hex(c) for c in colormaps["tab20"].colors]
    palette = [*tab20[0:14:2], *tab20[16::2], *tab20[1:15:2], *tab20[17::2], "#ad494a", "#8c6d31"]
    palette[2], palette[4], palette[7] = "#279e68", "#aa40fc", "#b5bd61"
    return palette


def _category_colors(adata, key: str, categories) -> list:
    """The colours scanpy would use: ``uns[key + '_colors']`` when it has one per category,
    else matplotlib's colour cycle (tab10) up to its length, ``default_20`` up to 20, and
    beyond that tab20, tab20b and tab20c (scanpy's 28/102-colour palettes are not matplotlib's)."""
    from matplotlib import colormaps
    from matplotlib.colors import is_color_like

    saved = adata.uns.get(f"{key}_colors")
    if saved is not None and len(saved) >= len(categories) and all(is_color_like(c) for c in saved):
        return list(saved)[: len(categories)]
    cycle = _pyplot().rcParams["axes.prop_cycle"].by_key()["color"]
    if len(categories) <= len(cycle):
        return cycle[: len(categories)]
    if len(categories) <= 20:
        return _default_20()[: len(categories)]
    many = [c for name in ("tab20", "tab20b", "tab20c") for c in colormaps[name].colors]
    return [many[i % len(many)] for i in range(len(categories))]


def _umap_panel(ax, coords: np.ndarray, values, key: str, colors: list | None, size: float) -> None:
    """One colour key: categories with a legend right of the panel, numbers with a colorbar."""
    import pandas as pd

    plt = _pyplot()
    if colors is not None:  # categorical: missing values light grey, drawn first (underneath)
        codes = values.codes
        order = np.argsort(codes >= 0, kind="stable")
        point_colors = np.array([*colors, "lightgray"], dtype=object)[codes]
        ax.scatter(coords[order, 0], coords[order, 1], c=list(point_colors[order]), s=size,
                   edgecolors="none", plotnonfinite=True, rasterized=True)
        legend = list(zip(map(str, values.categories), colors, strict=True))
        legend += [("NA", "lightgray")] if (codes < 0).any() else []  # scanpy's na_in_legend
        for label, color in legend:
            ax.scatter([], [], c=[color], label=label)
        n = len(legend)
        ax.legend(frameon=False, loc="center left", bbox_to_anchor=(1, 0.5),
                  ncol=1 if n <= 14 else 2 if n <= 30 else 3)
    else:  # numbers: the highest drawn last (on top), as scanpy's sort_order
        numbers = pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64)
        order = np.argsort(np.where(np.isnan(numbers), -np.inf, numbers), kind="stable")
        cmap = plt.get_cmap("viridis").with_extremes(bad="lightgray")
        points = ax.scatter(coords[order, 0], coords[order, 1], c=numbers[order], s=size, cmap=cmap,
                            edgecolors="none", plotnonfinite=True, rasterized=True)
        ax.figure.colorbar(points, ax=ax, pad=0.01, fraction=0.08, aspect=30)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_xlabel("UMAP1")
    ax.set_ylabel("UMAP2")
    ax.set_title(key)


def umap_figure(adata, colors: list[str]) -> bytes:
    """``obsm['X_umap']`` coloured by each obs column of ``colors``, one panel each (4 a row).

    As scanpy's ``pl.umap``: point size 120000 / n_cells; categorical columns (and strings
    and booleans, which scanpy makes categorical) with its palettes and a legend right of the
    panel; numerical columns in viridis with a colorbar.
    """
    import pandas as pd

    plt = _pyplot()
    if not colors:
        raise ValueError("umap_figure needs at least one obs column in colors")
    missing = [c for c in colors if c not in adata.obs.columns]
    if missing or "X_umap" not in adata.obsm:
        raise ValueError(f"umap_figure needs obsm['X_umap'] and the obs columns {colors} (missing: {missing})")
    coords = np.asarray(adata.obsm["X_umap"], dtype=np.float64)[:, :2]
    size = 120000 / adata.n_obs
    n_cols = min(4, len(colors))
    n_rows = -(-len(colors) // n_cols)
    width, height = plt.rcParams["figure.figsize"]
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(n_cols * width * 1.3, n_rows * height),
                             squeeze=False, layout="constrained")  # constrained: room for legends
    for ax in axes.flat[len(colors):]:
        ax.set_axis_off()
    for ax, key in zip(axes.flat, colors, strict=False):
        column = adata.obs[key]
        if isinstance(column.dtype, pd.CategoricalDtype) or not pd.api.types.is_numeric_dtype(column) \
                or pd.api.types.is_bool_dtype(column):
            values = column.astype("category").array  # anndata makes strings categorical, sorted
            _umap_panel(ax, coords, values, key, _category_colors(adata, key, values.categories), size)
        else:
            _umap_panel(ax, coords, column, key, None, size)
    return png_bytes(fig)


# ---------------------------------------------------------------- page

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0 auto;
       max-width: 1200px; padding: 0 24px 48px; color: #1b1b1b; }
h1 { font-size: 1.5em; margin-top: 24px; }
h2 { font-size: 1.2em; border-bottom: 1px solid #ddd; padding-bottom: 4px; margin-top: 32px; }
nav a { margin-right: 14px; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: left; vertical-align: top; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
th { background: #f4f4f4; }
img { max-width: 100%; display: block; margin: 8px 0; }
code { background: #f4f4f4; padding: 1px 4px; border-radius: 3px; }
.note { color: #555; }
.warn { color: #8a4b00; }
"""


def _e(text) -> str:
    return html.escape(str(text))


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _section(key: str, title: str, body: str) -> str:
    return f'<section id="{key}">\n<h2>{_e(title)}</h2>\n{body}\n</section>'


def _fmt(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def _summary(report: dict) -> str:
    rows = [("input", report["input"]), ("device", report["device"]),
            ("command", report["command"]),
            ("steps", f"{report['total_seconds']:.2f} s in all"
                      + (f", of which numba compilation {report['numba']['compile_seconds']:.2f} s "
                         f"({report['numba']['functions_compiled']} functions, cached for the next run)"
                         if report.get("numba", {}).get("functions_compiled") else "")),
            ("final shape", f"{report['final_shape'][0]:,} cells x {report['final_shape'][1]:,} genes"),
            ("host peak RSS", f"{_fmt(report['host_peak_rss_gib'], '.3f')} GiB"),
            ("device peak", f"{_fmt(report['device_peak_gib'], '.3f')} GiB")]
    if report.get("ari"):
        ari = report["ari"]
        rows.append(("Leiden vs " + ari["labels"],
                     f"ARI {ari['ari']:.3f} ({ari['n_clusters']} clusters, {ari['n_labels']} labels)"))
    versions = ", ".join(f"{k} {v}" for k, v in report["versions"].items())
    rows += [("versions", versions), ("machine", f"{report['machine'].get('cpu_model')}, "
                                                 f"{report['machine'].get('logical_cores')} logical cores"
                                      + (f", {report['machine']['gpu']}" if "gpu" in report["machine"] else "")),
             ("written", report["time"])]
    body = "\n".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in rows)
    return _section("summary", "Summary", f"<table>\n{body}\n</table>")


def _steps(report: dict) -> str:
    head = ("<tr><th>step</th><th>call</th><th>seconds</th><th>of which numba compilation</th>"
            "<th>cells x genes after</th><th>host peak GiB</th><th>device peak GiB</th><th>notes</th></tr>")
    rows = []
    for r in report["steps"]:
        call = report["calls"].get(r["step"], "")
        notes = "<br>".join(f'<span class="warn">{_e(w)}</span>' for w in r.get("warnings", []))
        if r["status"] != "ran":
            rows.append(f"<tr><td>{_e(r['step'])}</td><td><code>{_e(call)}</code></td>"
                        f'<td colspan="6" class="note">{_e(r["status"])}</td></tr>')
            continue
        rows.append(f"<tr><td>{_e(r['step'])}</td><td><code>{_e(call)}</code></td>"
                    f"<td class=num>{r['seconds']:.3f}</td>"
                    f"<td class=num>{_fmt(r.get('numba_compile_seconds'), '.3f')}</td>"
                    f"<td class=num>{r['n_obs']:,} x {r['n_vars']:,}</td>"
                    f"<td class=num>{_fmt(r['host_peak_rss_gib'], '.3f')}</td>"
                    f"<td class=num>{_fmt(r['device_peak_gib'], '.3f')}</td><td>{notes}</td></tr>")
    rows.append(f"<tr><th>total</th><td></td><td class=num><b>{report['total_seconds']:.3f}</b></td>"
                f'<td colspan="5"></td></tr>')
    note = f'<p class="note">{_e(report["timing_note"])}</p>'
    return _section("steps", "Steps", f"<table>\n{head}\n" + "\n".join(rows) + f"\n</table>\n{note}")


def _missing(step: str, report: dict) -> str:
    row = next((r for r in report["steps"] if r["step"] == step), None)
    why = "not run" if row is None else row["status"]
    return f'<p class="note">{_e(step)}: {_e(why)}.</p>'


def _ran(report: dict, step: str) -> bool:
    return any(r["step"] == step and r["status"] == "ran" for r in report["steps"])


def _qc(report: dict, snap: Snapshots) -> str:
    if snap.cell_qc is None:
        return _section("qc", "Quality control", _missing("calculate_qc_metrics", report))
    opts = report["options"]
    rows = {r["step"]: r for r in report["steps"]}
    n_cells, n_genes = len(snap.cell_qc), len(snap.gene_qc)
    flagged = "; ".join(f"{_e(k)}: {n:,} genes" for k, n in opts.get("qc_var_genes", {}).items())
    lines = [f"QC variables: {_e(', '.join(opts['qc_vars'])) or 'none'} ({flagged})."]
    if rows.get("filter_cells", {}).get("status") == "ran":
        kept = rows["filter_cells"]["n_obs"]
        lines.append(f"<code>filter_cells(min_genes={opts['min_genes']})</code>: kept {kept:,} of {n_cells:,} cells "
                     f"({n_cells - kept:,} removed).")
    if rows.get("filter_genes", {}).get("status") == "ran":
        kept = rows["filter_genes"]["n_vars"]
        lines.append(f"<code>filter_genes(min_cells={opts['min_cells']})</code>: kept {kept:,} of {n_genes:,} genes "
                     f"({n_genes - kept:,} removed).")
    body = "<p>" + "<br>".join(lines) + "</p>\n"  # the lines hold escaped values and our own <code>
    body += _img(qc_figure(snap, opts["min_genes"], opts["min_cells"]), "QC violins")
    body += '<p class="note">Before filtering; red lines: the thresholds.</p>'
    return _section("qc", "Quality control", body)


def _hvg(report: dict, snap: Snapshots) -> str:
    if snap.hvg is None or "highly_variable" not in snap.hvg.columns:
        return _section("hvg", "Highly variable genes", _missing("highly_variable_genes", report))
    n_hv = int(snap.hvg["highly_variable"].sum())
    body = (f"<p>{n_hv:,} of {len(snap.hvg):,} genes flagged "
            f"(<code>{_e(report['calls']['highly_variable_genes'])}</code>); the rest are dropped by the subset.</p>")
    return _section("hvg", "Highly variable genes", body + _img(hvg_figure(snap.hvg), "HVG mean-dispersion"))


def _pca(report: dict, adata) -> str:
    if "pca" not in adata.uns or "variance_ratio" not in adata.uns["pca"]:
        return _section("pca", "PCA", _missing("pca", report))
    ratio = np.asarray(adata.uns["pca"]["variance_ratio"], dtype=np.float64)
    return _section("pca", "PCA", _img(pca_figure(ratio), "PCA variance ratio"))


def _umap(report: dict, umap_png: bytes | None, colors: list[str]) -> str:
    if umap_png is None:
        return _section("umap", "UMAP", _missing("umap" if not _ran(report, "umap") else "leiden", report))
    body = f"<p>Coloured by {', '.join(f'<code>obs[{_e(repr(c))}]</code>' for c in colors)}.</p>"
    return _section("umap", "UMAP", body + _img(umap_png, "UMAP"))


def _markers(report: dict, adata, cluster_key: str) -> str:
    result = adata.uns.get("rank_genes_groups")
    if result is None:
        return _section("markers", "Marker genes", _missing("rank_genes_groups", report))
    names = result["names"]
    params = result.get("params", {})
    sizes = adata.obs[cluster_key].value_counts() if cluster_key in adata.obs else {}
    head = "<tr><th>cluster</th><th>cells</th>" + "".join(f"<th>{i + 1}</th>" for i in range(N_MARKERS)) + "</tr>"
    rows = []
    for group in names.dtype.names:
        lfc = result["logfoldchanges"][group][:N_MARKERS] if "logfoldchanges" in result else None
        cells = [f"{_e(n)}" + (f' <span class="note">({v:+.1f})</span>' if lfc is not None else "")
                 for n, v in zip(names[group][:N_MARKERS], lfc if lfc is not None else [0] * N_MARKERS, strict=False)]
        rows.append(f"<tr><th>{_e(group)}</th><td class=num>{int(sizes.get(group, 0)):,}</td>"
                    + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    body = (f"<p>Top {N_MARKERS} genes per cluster of <code>obs[{_e(repr(cluster_key))}]</code> against the rest "
            f"(method {_e(params.get('method', '?'))}, on {'adata.raw' if params.get('use_raw') else 'adata.X'}); "
            "log2 fold change in brackets.</p>")
    return _section("markers", "Marker genes", body + f"<table>\n{head}\n" + "\n".join(rows) + "\n</table>")


def write_html(path: Path, report: dict, adata, snap: Snapshots, *, cluster_key: str,
               umap_png: bytes | None, umap_colors: list[str]) -> None:
    """Write the report page; ``umap_png`` is the UMAP figure (also saved as umap.png)."""
    sections = [_summary(report), _steps(report), _qc(report, snap), _hvg(report, snap), _pca(report, adata),
                _umap(report, umap_png, umap_colors), _markers(report, adata, cluster_key)]
    nav = " ".join(f'<a href="#{key}">{key}</a>' for key in SECTIONS)
    page = (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<link rel="icon" href="data:,">\n'
            f"<title>gpusc run: {_e(report['input'])}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
            f"<h1>gpusc run</h1>\n<nav>{nav}</nav>\n" + "\n".join(sections) + "\n</body>\n</html>\n")
    path.write_text(page, encoding="utf-8")
