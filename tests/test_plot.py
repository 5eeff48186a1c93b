"""Heatmaps: token tick labels, facets, a colour scale symmetric around zero, files on disk."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

import patchspec
from patchspec.catalog import (
    ATTN_OUT,
    HEAD_ALL_POS_EVERY,
    HEAD_OUT_BY_POS,
    HEAD_PATTERN_DEST_SRC,
    RESID_PRE,
)
from patchspec.errors import InputError
from patchspec.plot import (
    as_heads,
    distinct_tokens,
    placement,
    plot,
    plot_interactive,
    plot_intervals,
    tick_labels,
)
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
    # The two prompts agree only on <bos>; elsewhere the index and "*" (tokens differ).
    assert result.pos_token.values.tolist()[:2] == ["<bos>", "w1|w5"]
    assert labels == ["0: <bos>", "1: *", "2: *", "3: *", "4: *"]
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
    assert all(texts(ax.get_xticklabels())[:2] == ["0: <bos>", "1: *"] for ax in axes)


def test_extra_dims_become_facet_columns_and_rows(gpt2, tmp_path):
    """(layer, pos, head): a panel per head; with col_wrap they wrap into rows."""
    r = HEAD_OUT_BY_POS.run(gpt2, CLEAN, CORRUPTED, per_example_metric)
    fig = plot(r, tmp_path / "heads.png")
    assert [ax.get_title() for ax in images(fig)] == [f"head = {h}" for h in range(4)]
    wrapped = plot(r, col_wrap=2)
    positions = {ax.get_subplotspec().rowspan.start for ax in images(wrapped)}
    assert positions == {0, 1}
    one_row = plot(r, col_wrap=4)
    assert {ax.get_subplotspec().rowspan.start for ax in images(one_row)} == {0}
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
    assert colorbar.get_ylabel() == "normalized effect"  # the formula is said once, in the title
    assert fig.get_suptitle().count(formula.split(": ")[1]) == 1
    assert fig.get_suptitle().startswith(f"{name} · per_example_metric · normalized (mean")
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


# --- token-label policy, shared scale, ax=/fig=, intervals, kv_head, sizes ---------------------

NORMALIZED = {
    "quantity": "normalized",
    "formula": "(patched - corrupted) / (clean - corrupted)",
    "direction": "denoising",
    "metric": "logit_diff",
}


def colorbar(fig):
    return next(ax for ax in fig.axes if ax.get_label() == "<colorbar>")


def test_label_policy_token_where_prompts_agree_else_index_or_name():
    """Agreeing positions show their token, others the index (``*``) or the position's name."""
    tokens = ["<bos>", "fox|owl|pen", "|", "a|", " supercalifragilistic"]
    a = xr.DataArray(np.zeros(5), dims="pos", coords={"pos_token": ("pos", tokens)})
    assert tick_labels(a, "pos") == ["0: <bos>", "1: *", "2: |", "3: a|", "4:  supercalifra…"]
    assert a.pos_token.values.tolist() == tokens  # the full set stays in the coordinate
    named = xr.DataArray(
        np.zeros(3),
        dims="pos",
        coords={"pos": ["S1", "IO", "END"], "pos_token": ("pos", ["John|Mary", "Mary", "."])},
    )
    assert tick_labels(named, "pos") == ["S1", "IO: Mary", "END: ."]
    assert distinct_tokens("fox|owl") == ["fox", "owl"] and distinct_tokens("|") == ["|"]
    missing = xr.DataArray(
        np.zeros(2),
        dims="pos",
        coords={"pos": [3, 4], "pos_token": ("pos", np.array(["a", np.nan], dtype=object))},
    )
    assert tick_labels(missing, "pos") == ["3: a", "4"]  # no token recorded: the index alone
    no_tokens = xr.DataArray(np.zeros(2), dims="head")
    assert tick_labels(no_tokens, "head") == ["0", "1"]


def test_label_policy_on_prompts_of_different_lengths(gpt2):
    """Ragged prompts agree on <bos> and where they share a word; padding makes the rest vary."""
    clean = ["w1 w2 w3", "w1 w2 w5 w6 w7"]
    corrupted = ["w9 w2 w3", "w9 w2 w5 w6 w8"]
    metric = patchspec.metrics.logprob(["w1", "w2"], reduce="none")
    r = RESID_PRE.sel(layer=[0]).run(gpt2, clean, corrupted, metric)
    labels = texts(images(plot(r))[0].get_xticklabels())
    assert labels[:3] == ["0: <bos>", "1: w1", "2: w2"]
    assert labels[3:] == ["3: *", "4: *", "5: *"]
    assert "|" in str(r.pos_token.values[3])


def test_colour_scale_is_shared_and_normalized_values_are_clipped():
    """One scale over every panel; normalised values on [-1, 1] unless clip=False."""
    noise = xr.DataArray(np.full((2, 3), 0.0008), dims=("layer", "pos"), attrs={"metric": "m"})
    ds = xr.Dataset({"noise": noise, "real": noise * 0 + 0.9})
    fig = plot(ds)
    assert [ax.images[0].get_clim() for ax in images(fig)] == [(-0.9, 0.9), (-0.9, 0.9)]
    big = xr.DataArray([[0.5, 1.7], [-0.2, 0.1]], dims=("layer", "pos"), attrs=NORMALIZED)
    clipped = plot(big)
    assert images(clipped)[0].images[0].get_clim() == (-1.0, 1.0)
    assert colorbar(clipped).get_ylabel() == "normalized effect"
    assert images(plot(big, clip=False))[0].images[0].get_clim() == (-1.7, 1.7)
    assert images(plot(big, vmax=0.5))[0].images[0].get_clim() == (-0.5, 0.5)
    raw = big.assign_attrs(quantity="effect")
    assert images(plot(raw))[0].images[0].get_clim() == (-1.7, 1.7)
    assert images(plot(raw, clip=True))[0].images[0].get_clim() == (-1.0, 1.0)


def test_ax_and_fig_parameters_draw_into_the_callers_figure():
    """ax= draws one panel into it; fig= lays the facets out in it; ax= with facets is refused."""
    from matplotlib.figure import Figure

    a = xr.DataArray(np.ones((2, 3)), dims=("layer", "pos"), attrs=NORMALIZED, name="r")
    mine = Figure()
    left, right = mine.subplots(1, 2)
    assert plot(a, ax=right) is mine
    assert right.images and not left.images
    assert "denoising" in right.get_title()
    faceted = xr.DataArray(np.ones((2, 3, 2)), dims=("layer", "pos", "head"), name="h")
    with pytest.raises(InputError, match=r"ax= draws one panel; this result has 2 facets \(head\)"):
        plot(faceted, ax=left)
    empty = Figure()
    assert plot(faceted, fig=empty) is empty
    assert [ax.get_title() for ax in images(empty)] == ["head = 0", "head = 1"]


def test_pvalues_are_drawn_on_a_log_scale(directions):
    """Small p-values dark, 1 light, the correction named on the colour bar."""
    from matplotlib.colors import LogNorm

    p = directions["noising"].patch.effect().patch.permutation_pvalue()
    fig = plot(p)
    (ax,) = images(fig)
    assert isinstance(ax.images[0].norm, LogNorm) and ax.images[0].norm.vmax == 1.0
    assert colorbar(fig).get_ylabel() == "p-value (bh)"


def test_intervals_are_drawn_as_bars(directions, tmp_path):
    """A bootstrap_ci result (bound dim) is drawn as one bar per cell, one colour per layer."""
    normalized = directions.patch.normalized()
    ci = normalized["resid_pre"].patch.bootstrap_ci(n_resamples=50)
    fig = plot(ci, tmp_path / "ci.png")
    (ax,) = [a for a in fig.axes if a.get_visible()]
    bars = ax.collections
    assert len(bars) >= 2  # one set of bars per layer (plus the faint ones crossing zero)
    segments = bars[0].get_segments()
    assert len(segments) == ci.sizes["pos"]
    low = ci.sel(layer=0, bound="low").values
    assert [s[0][1] for s in segments] == pytest.approx(low.tolist())
    assert texts(ax.get_xticklabels())[0] == "0: <bos>"
    assert fig.get_suptitle().startswith("intervals: resid_pre")
    assert (tmp_path / "ci.png").exists()
    both = plot_intervals(
        normalized.patch.bootstrap_ci(n_resamples=50), estimate=normalized, hue="layer"
    )
    titles = [a.get_title() for a in both.axes if a.get_visible()]
    assert titles[0].startswith("spec = resid_pre")
    with pytest.raises(InputError, match="needs a 'bound' dim"):
        plot_intervals(normalized["resid_pre"])


def test_kv_head_is_read_as_head_when_there_are_as_many(gpt2):
    """HEAD_ALL_POS_EVERY draws on a model with as many kv heads as heads; GQA is refused."""
    ds = HEAD_ALL_POS_EVERY.run(gpt2, CLEAN, CORRUPTED, per_example_metric)
    assert "kv_head" in ds["head_k"].dims
    fig = plot(ds.patch.normalized())
    axes = images(fig)
    assert [ax.get_title().split("\n")[0] for ax in axes] == [
        f"spec = {name}" for name in ds.data_vars
    ]
    assert {ax.get_xlabel() for ax in axes} == {"head"}
    gqa = xr.Dataset(
        {"q": (("layer", "head"), np.zeros((2, 4))), "k": (("layer", "kv_head"), np.ones((2, 2)))}
    )
    assert as_heads(gqa) is gqa
    with pytest.raises(InputError, match="kv_head is read as head only where"):
        plot(gqa)


@pytest.mark.parametrize(("n_layers", "n_pos"), [(2, 3), (12, 40), (48, 128)])
def test_sizes_stay_readable(n_layers, n_pos):
    """Figure size from the data's shape, thinned ticks, and a colour bar label kept."""
    tokens = [f"tok{i % 9}" if i % 5 else "a|b" for i in range(n_pos)]
    a = xr.DataArray(
        np.random.default_rng(0).normal(size=(n_layers, n_pos)),
        dims=("layer", "pos"),
        coords={"pos_token": ("pos", tokens)},
        attrs=NORMALIZED,
        name="resid_pre",
    )
    fig = plot(a)
    width, height = fig.get_size_inches()
    assert 4 <= width <= 24 and 3 <= height <= 20
    (ax,) = images(fig)
    fig.canvas.draw()  # lays the figure out
    box = ax.get_window_extent()
    inches_x, inches_y = box.width / fig.dpi, box.height / fig.dpi
    assert inches_x > 2 and inches_y > 1.2  # the panel never collapses to a strip
    assert len(ax.get_xticks()) <= max(3, 7 * inches_x)
    assert len(ax.get_yticks()) <= max(3, 7 * inches_y)
    label = colorbar(fig).yaxis.label
    assert label.get_text() == "normalized effect"
    inside = label.get_window_extent().y0 >= 0 and label.get_window_extent().y1 <= fig.bbox.height
    assert inside


def test_labels_and_titles_survive_save_and_load(result, tmp_path):
    """A saved and loaded result draws the same tick labels and title (pos_token round-trips)."""
    from patchspec import io

    normalized = result.patch.normalized()
    io.save(normalized, tmp_path / "r.nc")
    loaded = io.load(tmp_path / "r.nc")
    before, after = plot(normalized), plot(loaded)
    assert texts(images(after)[0].get_xticklabels()) == texts(images(before)[0].get_xticklabels())
    assert after.get_suptitle() == before.get_suptitle()
    assert loaded.pos_token.values.tolist() == normalized.pos_token.values.tolist()
