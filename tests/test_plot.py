"""Heatmaps: token tick labels, facets, a colour scale symmetric around zero, files on disk."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

import patchspec
from patchspec.catalog import ATTN_OUT, HEAD_OUT_BY_POS, HEAD_PATTERN_DEST_SRC, RESID_PRE
from patchspec.errors import InputError
from patchspec.plot import placement, plot, plot_interactive
from tests.conftest import per_example_metric
from tests.models import prompts

CLEAN = ["w1 w2 w3 w4", "w5 w6 w7 w8"]
CORRUPTED = ["w10 w2 w3 w4", "w5 w11 w7 w8"]


def images(fig):
    """The axes of a figure that hold a heatmap (not the colour bar)."""
    return [
        ax for ax in fig.axes if ax.images and ax.get_visible() and ax.get_label() != "<colorbar>"
    ]


def texts(labels) -> list[str]:
    return [t.get_text() for t in labels]


@pytest.fixture(scope="module")
def result(gpt2) -> xr.DataArray:
    """A per-example resid_pre sweep of text prompts."""
    return RESID_PRE.run(gpt2, CLEAN, CORRUPTED, per_example_metric)


def test_heatmap_renders_a_png_with_token_labels(result, tmp_path):
    """The position axis is labelled with the tokens; the file is a PNG."""
    path = tmp_path / "resid.png"
    fig = result.patch.normalized().patch.plot(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (ax,) = images(fig)
    labels = texts(ax.get_xticklabels())
    assert labels == [
        f"{p}: {t}" for p, t in zip(result.pos.values, result.pos_token.values, strict=True)
    ]
    assert "w2" in labels[2] and "<bos>" in labels[0]
    assert texts(ax.get_yticklabels()) == ["0", "1"]
    assert ax.get_xlabel() == "pos" and ax.get_ylabel() == "layer"
    assert "mean over 2 examples" in fig.get_suptitle()


def test_colour_scale_is_symmetric_around_zero(result):
    """``vmin == -vmax`` with ``vmax`` the largest absolute value shown."""
    fig = plot(result.patch.effect())
    (ax,) = images(fig)
    low, high = ax.images[0].get_clim()
    biggest = float(np.abs(result.patch.effect().mean("example")).max())
    assert low == -high and high == pytest.approx(biggest)
    assert images(plot(result, vmax=2.0))[0].images[0].get_clim() == (-2.0, 2.0)


def test_dataset_facets_over_specs(gpt2, tmp_path):
    """A Sweep's Dataset draws one panel per spec, on one colour scale."""
    ds = patchspec.Sweep(RESID_PRE, ATTN_OUT).run(gpt2, CLEAN, CORRUPTED, per_example_metric)
    fig = ds.patch.plot(tmp_path / "sweep.png")
    axes = images(fig)
    assert [ax.get_title() for ax in axes] == ["spec = resid_pre", "spec = attn_out"]
    assert len({ax.images[0].get_clim() for ax in axes}) == 1
    assert all("w2" in texts(ax.get_xticklabels())[2] for ax in axes)


def test_extra_dims_become_facet_columns_and_rows(gpt2, tmp_path):
    """(layer, pos, head): a panel per head; with col_wrap they wrap into rows."""
    r = HEAD_OUT_BY_POS.run(gpt2, CLEAN, CORRUPTED, per_example_metric)
    fig = plot(r, tmp_path / "heads.png")
    assert [ax.get_title() for ax in images(fig)] == [f"head = {h}" for h in range(4)]
    wrapped = plot(r, col_wrap=2)
    positions = {ax.get_subplotspec().rowspan.start for ax in images(wrapped)}
    assert positions == {0, 1}
    by_layer = plot(r, y="head", col="layer")
    assert [ax.get_title() for ax in images(by_layer)] == ["layer = 0", "layer = 1"]
    assert images(by_layer)[0].get_ylabel() == "head"


def test_pattern_sweep_labels_both_position_axes(gpt2):
    """dest_pos runs down y and src_pos along x, both with token labels; layer/head facet."""
    clean, corrupted = prompts(1, 4)
    r = HEAD_PATTERN_DEST_SRC.sel(layer=[1], head=[0, 1]).run(
        gpt2, clean, corrupted, per_example_metric
    )
    assert placement(r.mean("example")) == {
        "x": "src_pos",
        "y": "dest_pos",
        "col": "layer",
        "row": "head",
    }
    fig = plot(r)
    axes = images(fig)
    assert len(axes) == 2
    tokens = r["dest_pos_token"].values.tolist()
    assert texts(axes[0].get_yticklabels()) == [f"{i}: {t}" for i, t in enumerate(tokens)]
    assert texts(axes[0].get_xticklabels()) == [f"{i}: {t}" for i, t in enumerate(tokens)]


def test_one_dim_and_nan_cells_draw(tmp_path):
    """A 1-D result draws one row; NaN (not measured) cells are allowed."""
    r = xr.DataArray(
        [0.5, np.nan, -1.0], dims="pos", name="m", coords={"pos_token": ("pos", ["a", "b", "c"])}
    )
    fig = plot(r, tmp_path / "one.png")
    assert texts(images(fig)[0].get_xticklabels()) == ["0: a", "1: b", "2: c"]
    assert images(fig)[0].images[0].get_clim() == (-1.0, 1.0)


def test_errors_name_the_problem(gpt2, result):
    """Unknown dims, too many dims and mixed Dataset dims are clear errors."""
    with pytest.raises(InputError, match=r"x='position' is not a dim .* did you mean 'pos'"):
        plot(result, x="position")
    many = xr.DataArray(np.zeros((2, 2, 2, 2, 2)), dims=("a", "b", "c", "d", "e"))
    with pytest.raises(InputError, match=r"5 dims .* one too many"):
        plot(many)
    ds = xr.Dataset({"a": ("layer", [1.0, 2.0]), "b": ("pos", [1.0, 2.0, 3.0])})
    with pytest.raises(InputError, match="variables have different dims"):
        plot(ds)


def test_plot_interactive_needs_plotly(result):
    """Without plotly a clear error; with it, a figure."""
    try:
        import plotly  # noqa: F401
    except ImportError:
        with pytest.raises(InputError, match="needs plotly"):
            plot_interactive(result)
    else:
        fig = plot_interactive(result)
        assert fig.data[0].x[0].endswith("<bos>")


@pytest.fixture(scope="module")
def directions(gpt2) -> xr.Dataset:
    """One sweep of resid_pre in each direction: denoising, noising, mean ablation."""
    sweep = patchspec.Sweep(
        RESID_PRE,
        RESID_PRE.using(patchspec.Corrupted()).named("noising"),
        RESID_PRE.using(patchspec.Mean()).named("mean"),
    )
    return sweep.run(gpt2, CLEAN, CORRUPTED, per_example_metric)


@pytest.mark.parametrize(
    ("name", "formula"),
    [
        ("resid_pre", "denoising: (patched - corrupted) / (clean - corrupted)"),
        ("noising", "noising: (clean - patched) / (clean - corrupted)"),
        ("mean", "ablation: (clean - patched) / (clean - corrupted)"),
    ],
)
def test_titles_say_the_formula_of_the_direction(directions, name, formula):
    """The title and colour bar name each direction's own formula, never another's."""
    fig = plot(directions[name].patch.normalized())
    assert formula in fig.get_suptitle()
    colorbar = next(ax for ax in fig.axes if ax.get_label() == "<colorbar>")
    assert formula.split(": ")[1] in colorbar.get_ylabel()
    effect = plot(directions[name].patch.effect())
    expected = "patched - corrupted" if name == "resid_pre" else "clean - patched"
    assert effect.get_suptitle().endswith(expected)
    pvalue = plot(directions[name].patch.permutation_pvalue())
    assert f"p-value (bh) of {expected}" in pvalue.get_suptitle()


def test_dataset_of_mixed_directions_names_the_formula_per_panel(directions):
    """Specs that mean different things each say their formula in their own panel title."""
    fig = plot(directions.patch.normalized())
    titles = [ax.get_title() for ax in images(fig)]
    assert titles[0] == "spec = resid_pre\ndenoising: (patched - corrupted) / (clean - corrupted)"
    assert titles[1] == "spec = noising\nnoising: (clean - patched) / (clean - corrupted)"
    assert "(patched - corrupted)" not in fig.get_suptitle()
    effect = directions["noising"].patch.effect()
    same = plot(xr.Dataset({"a": effect, "b": 2 * effect}))
    assert [ax.get_title() for ax in images(same)] == ["spec = a", "spec = b"]
    assert same.get_suptitle().endswith("noising: clean - patched")
