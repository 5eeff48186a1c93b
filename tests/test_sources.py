"""Value sources (zero, mean, resample, Gaussian, noising) and neuron / sub-vector regions.

Every source is checked against a hand-written TransformerLens hook doing the same thing, on a
multi-head and a grouped-query model, with every registered engine.
"""

from __future__ import annotations

import json
import runpy
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import patchspec
from patchspec import (
    Clean,
    Corrupted,
    Gaussian,
    InputError,
    JointSpec,
    Mean,
    PatchSpec,
    Resample,
    SpecError,
    Zero,
    catalog,
    spec_from_dict,
)
from patchspec.execute.registry import ESTIMATORS
from patchspec.sources import Source, source_from_dict
from tests.conftest import per_example_metric
from tests.models import prompts

ROOT = Path(__file__).resolve().parents[1]
ENGINE_NAMES = sorted(ESTIMATORS)
RESID = PatchSpec("resid_pre", axes=("layer", "pos"))
HEADS = PatchSpec("z", axes=("layer", "head")).sel(pos=[-1, -2])

SOURCES: list[Source] = [
    Clean(),
    Corrupted(),
    Zero(),
    Zero(receiver="corrupted"),
    Mean(),
    Mean(over="reference"),
    Resample(seed=3),
    Resample(seed=1, donor="corrupted"),
    Gaussian(scale=0.5, seed=2),
    Gaussian(scale=2.0, relative=True, receiver="corrupted"),
]


@pytest.fixture(scope="module")
def data() -> dict[str, torch.Tensor]:
    """Four clean, four corrupted and three reference prompts of six tokens."""
    clean, corrupted = prompts(n=4, seed=5)
    reference, _ = prompts(n=3, seed=9)
    return {"clean": clean, "corrupted": corrupted, "reference": reference}


def cache_of(model, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in model.run_with_cache(tokens)[1].items()}


def expected_values(source: Source, model, data, hook: str) -> torch.Tensor:
    """The source's values at ``hook``, written out by hand."""
    own = cache_of(model, data[source.receiver])[hook]
    if isinstance(source, Clean | Corrupted):
        return cache_of(model, data[source.kind])[hook]
    if isinstance(source, Zero):
        return torch.zeros_like(own)
    if isinstance(source, Mean):
        pool = own if source.over == "batch" else cache_of(model, data["reference"])[hook]
        return pool.mean(0, keepdim=True).expand_as(own)
    if isinstance(source, Resample):
        donor = cache_of(model, data[source.donor or source.receiver])[hook]
        order = source.permutation(own.shape[0])
        return torch.stack([donor[order[b]] for b in range(own.shape[0])])
    if isinstance(source, Gaussian):
        digest_noise = source.noise(hook, tuple(own.shape))
        std = own.std() if source.relative else 1.0
        return own + source.scale * std * digest_noise
    raise AssertionError(source)


def by_hand(
    model, data, source: Source, cells: list[tuple[str, Callable[[torch.Tensor], tuple]]]
) -> torch.Tensor:
    """Patch each cell with a plain hook: ``act[index] = values[index]``; stack the metric."""
    out = []
    for hook, index in cells:
        values = expected_values(source, model, data, hook)

        def write(act: torch.Tensor, hook: object, values=values, index=index) -> torch.Tensor:
            act = act.clone()
            act[index] = values[index].to(act.dtype)
            return act

        logits = model.run_with_hooks(data[source.receiver], fwd_hooks=[(hook, write)])
        out.append(per_example_metric(logits.detach()))
    return torch.stack(out)


def resid_cells(model, seq: int) -> list[tuple[str, tuple]]:
    return [
        (f"blocks.{layer}.hook_resid_pre", (slice(None), pos))
        for layer in range(model.cfg.n_layers)
        for pos in range(seq)
    ]


def head_cells(model) -> list[tuple[str, tuple]]:
    rows = []
    for layer in range(model.cfg.n_layers):
        for head in range(model.cfg.n_heads):
            rows.append((f"blocks.{layer}.attn.hook_z", (slice(None), slice(-2, None), head)))
    return rows


def flat(result) -> torch.Tensor:
    return torch.as_tensor(result.values).reshape(-1, result.sizes["example"])


@pytest.mark.parametrize("engine", ENGINE_NAMES)
@pytest.mark.parametrize("source", SOURCES, ids=lambda s: s.label)
def test_source_equals_a_hand_written_hook(model, data, source, engine):
    """Each source patches exactly the values a hand-written hook writes (1e-5), every engine."""
    clean, corrupted = data["clean"], data["corrupted"]
    options = {"engine": engine, "progress": False, "reference": data["reference"]}
    got = RESID.using(source).run(model, clean, corrupted, per_example_metric, **options)
    want = by_hand(model, data, source, resid_cells(model, clean.shape[1]))
    torch.testing.assert_close(flat(got), want.double(), rtol=1e-5, atol=1e-5)
    got = HEADS.using(source).run(model, clean, corrupted, per_example_metric, **options)
    want = by_hand(model, data, source, head_cells(model))
    torch.testing.assert_close(flat(got), want.double(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_noising_equals_denoising_with_the_runs_swapped(model, data, engine):
    """Corrupted() with (clean, corrupted) gives Clean() with (corrupted, clean), cell by cell."""
    a, b = data["clean"], data["corrupted"]
    options = {"engine": engine, "progress": False}
    noising = catalog.HEAD_OUT_BY_POS.using(Corrupted()).run(
        model, a, b, per_example_metric, **options
    )
    denoising = catalog.HEAD_OUT_BY_POS.run(model, b, a, per_example_metric, **options)
    torch.testing.assert_close(
        torch.as_tensor(noising.values), torch.as_tensor(denoising.values), rtol=1e-5, atol=1e-5
    )
    assert noising.attrs["source"] == "corrupted" and denoising.attrs["source"] == "clean"


def test_gaussian_noise_is_reproducible_with_a_seed(gpt2, data):
    """Same seed: identical results; another seed: different ones; noise differs by hook."""
    run = {"engine": "reference", "progress": False}
    spec = RESID.sel(layer=0)

    def sweep(source: Source):
        return spec.using(source).run(
            gpt2, data["clean"], data["corrupted"], per_example_metric, **run
        )

    first, again = sweep(Gaussian(scale=1.0, seed=7)), sweep(Gaussian(scale=1.0, seed=7))
    other = sweep(Gaussian(scale=1.0, seed=8))
    assert (first.values == again.values).all()
    assert not torch.allclose(torch.as_tensor(first.values), torch.as_tensor(other.values))
    noise = Gaussian(scale=1.0, seed=7)
    a = noise.noise("blocks.0.hook_resid_pre", (4, 6, 32))
    assert torch.equal(a, noise.noise("blocks.0.hook_resid_pre", (4, 6, 32)))
    assert not torch.equal(a, noise.noise("blocks.1.hook_resid_pre", (4, 6, 32)))
    assert abs(float(a.std()) - 1.0) < 0.1 and abs(float(a.mean())) < 0.1


def test_resample_permutation_is_a_seeded_derangement():
    """Resample gives no prompt its own activation; the permutation depends only on the seed."""
    for seed in range(20):
        perm = Resample(seed=seed).permutation(5)
        assert sorted(perm) == list(range(5)) and all(perm[b] != b for b in range(5))
        assert perm == Resample(seed=seed).permutation(5)
    assert Resample().permutation(2) == (1, 0)
    with pytest.raises(InputError, match="Resample needs at least two prompts"):
        Resample().permutation(1)


def test_mean_over_padded_prompts_leaves_padding_out(gpt2):
    """Mean(over='batch') of right-padded text prompts averages only real tokens per position."""
    clean = ["w1 w2 w3", "w4 w5 w6 w7 w8", "w9 w10 w11 w12"]
    corrupted = ["w13 w2 w3", "w14 w5 w6 w7 w8", "w15 w10 w11 w12"]
    spec = PatchSpec("resid_pre", axes=("pos",)).sel(layer=1)
    got = spec.using(Mean()).run(gpt2, clean, corrupted, per_example_metric, engine="reference")
    tokens = gpt2.to_tokens(clean, padding_side="right")
    lengths = torch.tensor([len(gpt2.to_tokens(p)[0]) for p in clean])
    real = (torch.arange(tokens.shape[1]) < lengths[:, None]).float()
    act = cache_of(gpt2, tokens)["blocks.1.hook_resid_pre"]
    mean = (act * real[..., None]).sum(0) / real.sum(0)[:, None]
    for pos in range(tokens.shape[1]):

        def write(a, hook, pos=pos):
            a = a.clone()
            a[:, pos] = mean[pos]
            return a

        logits = gpt2.run_with_hooks(tokens, fwd_hooks=[("blocks.1.hook_resid_pre", write)])
        torch.testing.assert_close(
            torch.as_tensor(got.sel(pos=pos).values),
            per_example_metric(logits).double(),
            rtol=1e-5,
            atol=1e-5,
        )


# --- sources as a swept axis ---------------------------------------------------------------------


@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_sources_sweep_as_their_own_axis(model, data, engine):
    """over_sources adds a labelled source dim whose slices equal one-source sweeps."""
    sources = (Corrupted(), Zero(), Mean(), Gaussian(scale=0.3))
    spec = HEADS.over_sources(*sources)
    options = {"engine": engine, "progress": False}
    result = spec.run(model, data["clean"], data["corrupted"], per_example_metric, **options)
    assert result.dims == ("source", "layer", "head", "example")
    assert list(result.source.values) == ["corrupted", "zero", "mean", "gaussian(scale=0.3)"]
    for source in sources:
        alone = HEADS.using(source).run(
            model, data["clean"], data["corrupted"], per_example_metric, **options
        )
        torch.testing.assert_close(
            torch.as_tensor(result.sel(source=source.label).values),
            torch.as_tensor(alone.values),
            rtol=1e-5,
            atol=1e-5,
        )
    assert result.attrs["source"] == "corrupted, zero, mean, gaussian"
    assert [source_from_dict(d) for d in result.attrs["sources"]] == list(sources)


def test_source_axis_by_restriction_equals_over_sources():
    """Listing sources in restrictions is the same spec as over_sources."""
    by_hand = PatchSpec(
        "z", axes=("source", "layer", "head"), restrictions={"source": (Corrupted(), Zero())}
    )
    assert by_hand == PatchSpec("z", axes=("layer", "head")).over_sources(Corrupted(), Zero())
    assert by_hand.sources == (Corrupted(), Zero()) and by_hand.receiver == "clean"


def test_mixed_receivers_are_a_clear_error():
    """Sources patching different runs cannot share a sweep or a joint spec."""
    with pytest.raises(SpecError, match=r"all sources swept by one spec must patch the same run"):
        HEADS.over_sources(Clean(), Zero())
    with pytest.raises(SpecError, match=r"must patch the same run"):
        JointSpec([HEADS.using(Zero()), HEADS])
    assert HEADS.over_sources(Clean(), Zero(receiver="corrupted")).receiver == "corrupted"


def test_source_axis_needs_listed_sources():
    """A source axis without sources, or with non-sources, says how to list them."""
    with pytest.raises(
        SpecError, match=r"axis 'source' sweeps value sources and needs them listed"
    ):
        PatchSpec("z", axes=("source", "layer"))
    with pytest.raises(SpecError, match=r"needs them listed.*got \('zero', 'mean'\)"):
        PatchSpec("z", axes=("source", "layer"), restrictions={"source": ("zero", "mean")})


# --- serialisation and validation ------------------------------------------------------------------


@pytest.mark.parametrize("source", SOURCES, ids=lambda s: s.label)
def test_sources_round_trip_through_dicts_and_json(source):
    """Each source and a spec using it survive to_dict -> JSON -> from_dict."""
    assert source_from_dict(json.loads(json.dumps(source.to_dict()))) == source
    spec = HEADS.using(source)
    assert PatchSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    assert hash(source) == hash(source_from_dict(source.to_dict()))


def test_source_axis_and_joint_specs_round_trip():
    """A swept source axis and a joint spec of ablations serialise to plain data and back."""
    spec = HEADS.over_sources(Corrupted(), Resample(seed=2), Gaussian(scale=0.1, relative=True))
    data = json.loads(json.dumps(spec.to_dict()))
    assert data["restrictions"]["source"][1] == {
        "kind": "resample",
        "seed": 2,
        "donor": None,
        "receiver": "clean",
    }
    assert PatchSpec.from_dict(data) == spec
    joint = HEADS.using(Zero()) & RESID.using(Mean(over="ioi"))
    assert spec_from_dict(json.loads(json.dumps(joint.to_dict()))) == joint


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            {"kind": "zeros"},
            r"unknown source kind 'zeros'; valid kinds are clean, corrupted, zero, .*did you mean 'zero'\?",
        ),
        ({"scale": 1.0}, r"unknown source kind None"),
        (
            {"kind": "gaussian", "scal": 1.0},
            r"unknown field 'scal' for source kind 'gaussian'.*did you mean 'scale'\?",
        ),
        ({"kind": "gaussian"}, r"bad fields \{\} for source kind 'gaussian'"),
        (
            {"kind": "gaussian", "scale": 0},
            r"Gaussian.scale must be a positive finite number, got 0",
        ),
        (
            {"kind": "gaussian", "scale": float("nan")},
            r"Gaussian.scale must be a positive finite number",
        ),
        ({"kind": "resample", "seed": -1}, r"Resample.seed must be a non-negative int, got -1"),
        (
            {"kind": "resample", "donor": "both"},
            r"Resample.donor must be 'clean' or 'corrupted', got 'both'",
        ),
        ({"kind": "zero", "receiver": "noisy"}, r"Zero.receiver must be 'clean' or 'corrupted'"),
        (
            {"kind": "mean", "over": ""},
            r"Mean.over must be 'batch' or the name of a reference dataset",
        ),
        (
            {"kind": "gaussian", "scale": 1, "relative": "yes"},
            r"Gaussian.relative must be True or False",
        ),
    ],
)
def test_bad_sources_are_clear_errors(data, message):
    """Unknown kinds and fields, and bad field values, name the value and what is valid."""
    with pytest.raises(SpecError, match=message):
        source_from_dict(data)


def test_missing_or_mismatched_reference_dataset(gpt2, data):
    """Mean over a reference needs it passed at run time, with the sweep's token length."""
    spec = RESID.sel(layer=0).using(Mean(over="ioi"))
    with pytest.raises(
        InputError, match=r"Mean\(over='ioi'\) needs a reference dataset 'ioi'.*given: none"
    ):
        spec.run(gpt2, data["clean"], data["corrupted"], per_example_metric, engine="reference")
    with pytest.raises(
        InputError, match=r"reference dataset 'ioi' has prompts of .* same token length"
    ):
        spec.run(
            gpt2,
            data["clean"],
            data["corrupted"],
            per_example_metric,
            engine="reference",
            reference={"ioi": data["reference"][:, :4]},
        )
    named = spec.run(
        gpt2,
        data["clean"],
        data["corrupted"],
        per_example_metric,
        engine="reference",
        reference={"ioi": data["reference"]},
    )
    default = (
        RESID.sel(layer=0)
        .using(Mean(over="reference"))
        .run(
            gpt2,
            data["clean"],
            data["corrupted"],
            per_example_metric,
            engine="reference",
            reference=data["reference"],
        )
    )
    assert (named.values == default.values).all()


def test_resample_of_one_prompt_is_a_clear_error(gpt2, data):
    """Resampling needs another prompt to take values from."""
    with pytest.raises(InputError, match="Resample needs at least two prompts"):
        RESID.sel(layer=0, pos=1).using(Resample()).run(
            gpt2, data["clean"][:1], data["corrupted"][:1], per_example_metric, engine="reference"
        )


def test_new_sources_are_exported():
    """The sources are public names of the package."""
    for name in ("Zero", "Mean", "Resample", "Gaussian"):
        assert name in patchspec.__all__ and getattr(patchspec, name) is getattr(
            patchspec.sources, name
        )


# --- neuron-level and sub-vector regions ----------------------------------------------------------


def neuron_cells(model, activation: str, with_pos: bool) -> list[tuple[str, tuple]]:
    rows = []
    for layer in range(model.cfg.n_layers):
        for neuron in (0, 5, 17):
            positions = (1, -1) if with_pos else (None,)
            for pos in positions:
                index = (slice(None), slice(None) if pos is None else pos, neuron)
                rows.append((f"blocks.{layer}.mlp.hook_{activation}", index))
    return rows


@pytest.mark.parametrize("engine", ENGINE_NAMES)
@pytest.mark.parametrize("activation", ["pre", "post"])
@pytest.mark.parametrize("with_pos", [False, True], ids=["layer_neuron", "layer_neuron_pos"])
def test_mlp_neurons_end_to_end(model, data, engine, activation, with_pos):
    """MLP neurons by layer x neuron (x pos) patch exactly those neurons, for every engine."""
    axes = ("layer", "neuron", "pos") if with_pos else ("layer", "neuron")
    spec = PatchSpec(activation, axes=axes).sel(
        neuron=[0, 5, 17], **({"pos": [1, -1]} if with_pos else {})
    )
    for source in (Clean(), Zero()):
        got = spec.using(source).run(
            model,
            data["clean"],
            data["corrupted"],
            per_example_metric,
            engine=engine,
            progress=False,
        )
        assert got.dims[: len(axes)] == axes and list(got.neuron.values) == [0, 5, 17]
        want = by_hand(model, data, source, neuron_cells(model, activation, with_pos))
        torch.testing.assert_close(flat(got), want.double(), rtol=1e-5, atol=1e-5)


def head_and_previous_position(cell: dict) -> dict:
    """A custom rule: head ``head`` at position ``pos`` and the one before it."""
    return {"layer": cell["layer"], "head": cell["head"], "pos": (cell["pos"], cell["pos"] - 1)}


def d_model_block(cell: dict) -> dict:
    """A custom rule: an 8-wide slice of the residual stream, numbered by ``block``."""
    return {"layer": 1, "pos": -1, "d_model": range(8 * cell["block"], 8 * cell["block"] + 8)}


@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_custom_rules_over_activation_dims(model, data, engine):
    """Documented custom rules (head at p and p-1; slices of d_model) equal hand-written hooks."""
    options = {"engine": engine, "progress": False}
    spec = PatchSpec("z", axes=("layer", "head", "pos"), rule=head_and_previous_position).sel(
        pos=[2, 5]
    )
    got = spec.run(model, data["clean"], data["corrupted"], per_example_metric, **options)
    cells = [
        (f"blocks.{layer}.attn.hook_z", (slice(None), [pos, pos - 1], head))
        for layer in range(model.cfg.n_layers)
        for head in range(model.cfg.n_heads)
        for pos in (2, 5)
    ]
    torch.testing.assert_close(
        flat(got), by_hand(model, data, Clean(), cells).double(), rtol=1e-5, atol=1e-5
    )
    spec = PatchSpec(
        "resid_pre", axes=("block",), restrictions={"block": (0, 1, 2, 3)}, rule=d_model_block
    )
    got = spec.using(Zero()).run(
        model, data["clean"], data["corrupted"], per_example_metric, **options
    )
    cells = [
        ("blocks.1.hook_resid_pre", (slice(None), -1, slice(8 * b, 8 * b + 8))) for b in range(4)
    ]
    torch.testing.assert_close(
        flat(got), by_hand(model, data, Zero(), cells).double(), rtol=1e-5, atol=1e-5
    )


# --- the guide and the example ---------------------------------------------------------------------


def test_custom_patch_type_example_runs(capsys):
    """examples/custom_patch_type.py runs and prints named positions and every source."""
    runpy.run_path(str(ROOT / "examples" / "custom_patch_type.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "IO     S1     S2    END" in out and "gaussian(scale=1.0, relative=True)" in out
