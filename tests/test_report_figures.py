"""The report's figures drawn with matplotlib alone, checked against scanpy's own plots
(``sc.pl.highly_variable_genes``, ``sc.pl.umap``): the same points, colours, labels and
legends; and the report's adjusted Rand index against scikit-learn's."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from matplotlib.colors import to_rgba_array
from scipy import sparse

from gpusc import _report


@pytest.fixture
def captured(monkeypatch):
    """The figures the report draws, kept open (png_bytes closes them) so the test can read them."""
    figures = []
    render = _report.png_bytes

    def keep(fig):
        figures.append(fig)
        png = render(fig)
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
        return png

    monkeypatch.setattr(_report, "png_bytes", keep)
    yield figures
    _report._pyplot().close("all")


def _points(ax):
    """(x, y, r, g, b, a) of every point the panel draws, in a canonical order, and their sizes."""
    rows, sizes = [], []
    for collection in ax.collections:
        offsets = np.asarray(collection.get_offsets(), dtype=np.float64)
        if offsets.size == 0:
            continue
        collection.update_scalarmappable()  # numbers become colours only when drawn
        colors = to_rgba_array(collection.get_facecolors())
        if colors.shape[0] == 1:
            colors = np.repeat(colors, offsets.shape[0], axis=0)
        rows.append(np.hstack([offsets, colors]))
        sizes.append(np.broadcast_to(collection.get_sizes(), offsets.shape[0]))
    rows = np.vstack(rows)
    return rows[np.lexsort(rows.T[::-1])], np.concatenate(sizes)


def _counts(seed: int, n_cells: int = 300, n_genes: int = 400):
    rng = np.random.default_rng(seed)
    scale = rng.gamma(0.6, 1.0, n_genes)
    counts = rng.poisson(scale * rng.gamma(2.0, 1.0, (n_cells, 1))).astype(np.float32)
    return ad.AnnData(sparse.csr_matrix(counts), var=pd.DataFrame(index=[f"g{i}" for i in range(n_genes)]))


@pytest.mark.parametrize("flavor", ["seurat", "cell_ranger", "seurat_v3", "seurat_v3_batch", "seurat_batch"])
def test_hvg_figure_matches_scanpy(flavor, captured):
    import scanpy as sc

    adata = _counts(0)
    batch = {"batch_key": "batch"} if flavor.endswith("_batch") else {}
    adata.obs["batch"] = np.where(np.arange(adata.n_obs) % 2 == 0, "a", "b")
    if flavor.startswith("seurat_v3"):
        sc.pp.highly_variable_genes(adata, flavor="seurat_v3", n_top_genes=80, **batch)
    else:
        sc.pp.normalize_total(adata)
        sc.pp.log1p(adata)
        sc.pp.highly_variable_genes(adata, flavor=flavor.removesuffix("_batch"), n_top_genes=80, **batch)
    saved = adata.var[[c for c in _report.HVG_COLUMNS if c in adata.var.columns]].copy()  # as Snapshots keeps

    _report.hvg_figure(saved)
    ours = captured[-1].axes
    sc.pl.highly_variable_genes(saved, show=False)
    theirs = _report._pyplot().gcf().axes
    assert len(ours) == len(theirs) == 2
    for mine, scanpys in zip(ours, theirs, strict=True):
        assert mine.get_xlabel() == scanpys.get_xlabel() == "mean expressions of genes"
        assert mine.get_ylabel() == scanpys.get_ylabel()
        np.testing.assert_array_equal(_points(mine)[0], _points(scanpys)[0])
    assert ("variances" in ours[0].get_ylabel()) == flavor.startswith("seurat_v3")
    assert [t.get_text() for t in ours[0].get_legend().get_texts()] == ["highly variable genes", "other genes"]


def test_hvg_figure_names_missing_columns():
    with pytest.raises(ValueError, match="dispersions"):
        _report.hvg_figure(pd.DataFrame({"means": [1.0], "highly_variable": [True]}))


def _embedded(n_cells: int, n_leiden: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    adata = ad.AnnData(np.zeros((n_cells, 2), dtype=np.float32))
    adata.obs_names = [f"c{i}" for i in range(n_cells)]
    adata.obsm["X_umap"] = rng.normal(size=(n_cells, 2)).astype(np.float32)
    adata.obs["leiden"] = pd.Categorical(rng.integers(0, n_leiden, n_cells).astype(str),
                                         categories=[str(i) for i in range(n_leiden)])
    labels = rng.choice(["B", "T", "NK"], n_cells).astype(object)
    labels[rng.random(n_cells) < 0.1] = None  # cells without a label: light grey
    adata.obs["louvain"] = pd.Categorical(labels)
    adata.obs["sample"] = rng.choice(["s2", "s1"], n_cells)  # strings: scanpy makes them categorical
    adata.obs["total_counts"] = rng.gamma(2.0, 1000.0, n_cells)
    adata.obs["n_genes"] = rng.integers(100, 900, n_cells)
    return adata


@pytest.mark.parametrize(("n_leiden", "keys"), [
    (7, ["leiden", "louvain", "sample", "total_counts", "n_genes"]),  # tab10, a second row of panels
    (16, ["leiden", "total_counts"]),  # scanpy's default_20
])
def test_umap_figure_matches_scanpy(n_leiden, keys, captured):
    import scanpy as sc

    adata = _embedded(240, n_leiden)
    _report.umap_figure(adata, keys)
    ours = [ax for ax in captured[-1].axes if ax.get_title() in keys]  # colorbars are axes too
    theirs_adata = adata.copy()
    theirs_adata.obs["sample"] = theirs_adata.obs["sample"].astype("category")
    fig = sc.pl.umap(theirs_adata, color=keys, show=False, return_fig=True)
    theirs = [ax for ax in fig.axes if ax.get_title() in keys]
    assert [ax.get_title() for ax in ours] == [ax.get_title() for ax in theirs] == keys
    colorbars = [ax for ax in captured[-1].axes if ax.get_title() not in keys and ax.get_visible() and ax.axison]
    assert len(colorbars) == 2 if "n_genes" in keys else len(colorbars) == 1
    for mine, scanpys, key in zip(ours, theirs, keys, strict=True):
        assert (mine.get_xlabel(), mine.get_ylabel()) == ("UMAP1", "UMAP2")
        assert len(mine.get_xticks()) == len(mine.get_yticks()) == 0
        points, sizes = _points(mine)
        expected, expected_sizes = _points(scanpys)
        np.testing.assert_allclose(sizes, 120000 / adata.n_obs)
        np.testing.assert_allclose(expected_sizes, sizes)
        np.testing.assert_allclose(points[:, :2], expected[:, :2], rtol=1e-6)
        if key in ("total_counts", "n_genes"):  # viridis on the same range
            np.testing.assert_allclose(points[:, 2:], expected[:, 2:], atol=1e-6)
            assert mine.get_legend() is None
        else:
            np.testing.assert_allclose(points[:, 2:], expected[:, 2:], atol=1e-6)
            labels = [t.get_text() for t in mine.get_legend().get_texts()]
            assert labels == [t.get_text() for t in scanpys.get_legend().get_texts()]


def test_umap_figure_uses_saved_colors_and_many_categories(captured):
    adata = _embedded(200, 25)
    _report.umap_figure(adata, ["leiden"])
    legend = captured[-1].axes[0].get_legend()
    assert len(legend.get_texts()) == 25 and legend._ncols == 2  # scanpy: 2 legend columns for 15-30
    adata.obs["louvain"] = adata.obs["louvain"].cat.remove_unused_categories()
    adata.uns["louvain_colors"] = ["#ff0000", "#00ff00", "#0000ff"]
    _report.umap_figure(adata, ["louvain"])
    points, _ = _points(captured[-1].axes[0])
    used = {tuple(c) for c in np.round(points[:, 2:], 6)}
    assert used == {tuple(np.round(to_rgba_array(c)[0], 6)) for c in [*adata.uns["louvain_colors"], "lightgray"]}


def test_umap_figure_names_missing_column():
    with pytest.raises(ValueError, match="nope"):
        _report.umap_figure(_embedded(50, 3), ["leiden", "nope"])


# ---------------------------------------------------------------- ARI


@pytest.mark.parametrize("n_cells", [2, 3, 17, 500, 20000])
@pytest.mark.parametrize(("n_a", "n_b"), [(2, 2), (3, 8), (12, 5), (40, 40)])
def test_adjusted_rand_index_matches_sklearn(n_cells, n_a, n_b):
    from sklearn.metrics import adjusted_rand_score

    rng = np.random.default_rng(n_cells * 100 + n_a)
    a = rng.integers(0, n_a, n_cells)
    b = np.where(rng.random(n_cells) < 0.6, a % n_b, rng.integers(0, n_b, n_cells))  # related partitions
    words = np.array([f"type {i}" for i in range(n_a)], dtype=object)[a]
    for left, right in ((a, b), (words, b), (pd.Categorical(words), pd.Series(b.astype(str)))):
        assert _report.adjusted_rand_index(left, right) == pytest.approx(adjusted_rand_score(left, right),
                                                                          rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("case", ["identical", "renamed", "one_cluster_each", "singletons_each", "one_vs_singletons",
                                  "one_vs_two", "one_cell", "empty"])
def test_adjusted_rand_index_special_cases(case):
    from sklearn.metrics import adjusted_rand_score

    n = 60
    rng = np.random.default_rng(1)
    a, b = {
        "identical": (rng.integers(0, 5, n), None),
        "renamed": (np.repeat(["x", "y", "z"], 20), np.repeat([7, 3, 5], 20)),
        "one_cluster_each": (np.zeros(n, int), np.full(n, "all")),
        "singletons_each": (np.arange(n), rng.permutation(n).astype(str)),
        "one_vs_singletons": (np.zeros(n, int), np.arange(n)),
        "one_vs_two": (np.zeros(n, int), np.arange(n) % 2),
        "one_cell": (np.array([3]), np.array(["a"])),
        "empty": (np.array([], int), np.array([], int)),
    }[case]
    b = a.copy() if b is None else b
    expected = adjusted_rand_score(a, b)
    assert _report.adjusted_rand_index(a, b) == pytest.approx(expected, abs=1e-12)
    if case in ("identical", "renamed", "one_cluster_each", "singletons_each", "one_cell", "empty"):
        assert expected == 1.0


def test_adjusted_rand_index_rejects_bad_input():
    with pytest.raises(ValueError, match="same cells"):
        _report.adjusted_rand_index([0, 1, 1], [0, 1])
    with pytest.raises(ValueError, match="missing"):
        _report.adjusted_rand_index(pd.Categorical(["a", None]), [0, 1])
