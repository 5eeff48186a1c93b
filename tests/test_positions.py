"""Named positions resolved per prompt, on prompts of different lengths (right padding)."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from patchspec import Corrupted, InputError, PatchSpec, SpecError, catalog, metrics
from patchspec.execute.registry import ESTIMATORS
from patchspec.plan import PerExample, Sizes, compile, resolve_positions
from tests.models import VOCAB

ENGINE_NAMES = sorted(ESTIMATORS)
PAD = VOCAB.index("<pad>")
LENGTHS = (5, 7, 6)
POSITIONS = {"S": [2, 3, 1], "END": -1}
SPECS = {
    "head_out_by_pos": catalog.HEAD_OUT_BY_POS,
    "head_out_at_end": catalog.HEAD_OUT.sel(pos="END"),
    "pattern_named": PatchSpec("pattern", axes=("layer", "head", "dest_pos", "src_pos")).sel(
        dest_pos="END", src_pos=("S", "END")
    ),
}


def rows(seed: int, lengths=LENGTHS) -> list[list[int]]:
    """One random prompt per length (BOS first)."""
    gen = torch.Generator().manual_seed(seed)
    return [[0, *torch.randint(3, len(VOCAB), (n - 1,), generator=gen).tolist()] for n in lengths]


def padded(prompts: list[list[int]]) -> dict[str, torch.Tensor]:
    """Right-padded tokens with their attention mask (as a tokenizer returns them)."""
    length = max(map(len, prompts))
    return {
        "input_ids": torch.tensor([p + [PAD] * (length - len(p)) for p in prompts]),
        "attention_mask": torch.tensor([[1] * len(p) + [0] * (length - len(p)) for p in prompts]),
    }


def last_positions(prompts: list[list[int]]) -> list[int]:
    return [len(p) - 1 for p in prompts]


def alone(spec: PatchSpec, resolved: dict[str, int]) -> PatchSpec:
    """The spec with each name replaced by this prompt's integer index."""

    def swap(value):
        if isinstance(value, str):
            return resolved[value]
        if isinstance(value, tuple) and value and isinstance(value[0], str):
            return tuple(resolved[v] for v in value)
        return value

    return spec.sel(**{k: swap(v) for k, v in spec.restrictions})


@pytest.mark.parametrize("engine", ENGINE_NAMES)
@pytest.mark.parametrize("name", SPECS)
def test_named_positions_equal_patching_each_prompt_alone(model, name, engine):
    """Names on right-padded prompts of different lengths give each prompt's own unpadded numbers."""
    spec = SPECS[name]
    clean, corrupted = rows(1), rows(2)
    metric = metrics.logit_diff(5, 7, pos=last_positions(corrupted), reduce="none")
    got = spec.run(
        model,
        padded(clean),
        padded(corrupted),
        metric,
        engine=engine,
        progress=False,
        positions=POSITIONS,
    )
    for b, length in enumerate(LENGTHS):
        resolved = {"S": POSITIONS["S"][b], "END": length - 1}
        single = alone(spec, resolved)
        if "pos" in spec.axes:
            single = single.sel(pos=[resolved["S"], resolved["END"]])
        want = single.run(
            model,
            torch.tensor([clean[b]]),
            torch.tensor([corrupted[b]]),
            metrics.logit_diff(5, 7, reduce="none"),
            engine="reference",
            progress=False,
        )
        torch.testing.assert_close(
            torch.as_tensor(got.isel(example=b).values),
            torch.as_tensor(want.isel(example=0).values),
            rtol=1e-5,
            atol=1e-5,
        )


@pytest.mark.parametrize("engine", ENGINE_NAMES)
@pytest.mark.parametrize("source", ["clean", "corrupted"])
def test_names_at_different_indices_in_clean_and_corrupted(gpt2, engine, source):
    """A name's activation moves from the donor's index of that name to the receiver's index."""
    clean = ["w1 w2 w3 w4", "w5 w6 w7 w8 w9"]
    corrupted = ["w11 w12 w2 w3 w4", "w15 w7 w8 w9"]
    tables = ({"X": [2, 3], "END": -1}, {"X": [3, 2], "END": -1})
    texts = {"clean": clean, "corrupted": corrupted}
    receiver = "corrupted" if source == "clean" else "clean"
    lengths = {k: [len(gpt2.to_tokens(p)[0]) for p in v] for k, v in texts.items()}
    metric = metrics.logit_diff(5, 7, reduce="none")  # each prompt's own end, in either run
    spec = catalog.RESID_PRE if source == "clean" else catalog.RESID_PRE.using(Corrupted())
    got = spec.run(gpt2, clean, corrupted, metric, engine=engine, progress=False, positions=tables)
    assert list(got.pos.values) == ["X", "END"]
    index = {
        run: {"X": table["X"], "END": [n - 1 for n in lengths[run]]}
        for run, table in zip(("clean", "corrupted"), tables, strict=True)
    }
    for b in range(2):
        donor_cache = gpt2.run_with_cache(texts[source][b])[1]
        for layer in range(2):
            for name in ("X", "END"):
                hook = f"blocks.{layer}.hook_resid_pre"

                def write(act, hook, b=b, name=name, cache=donor_cache, at=hook):
                    act = act.clone()
                    act[0, index[receiver][name][b]] = cache[at][0, index[source][name][b]]
                    return act

                logits = gpt2.run_with_hooks(texts[receiver][b], fwd_hooks=[(hook, write)])
                want = float((logits[0, -1, 5] - logits[0, -1, 7]).detach())
                assert float(got.sel(layer=layer, pos=name).isel(example=b)) == pytest.approx(
                    want, abs=1e-5
                )


def test_left_padding_tokenizers_still_pad_right(gpt2):
    """Text prompts are padded on the right whatever the tokenizer's padding side."""
    clean, corrupted = ["w1 w2 w3", "w4 w5 w6 w7 w8"], ["w9 w2 w3", "w10 w5 w6 w7 w8"]
    spec = catalog.RESID_PRE.sel(layer=1)
    metric = metrics.logit_diff(5, 7, pos=[3, 5], reduce="none")
    options = {"engine": "reference", "progress": False, "positions": {"A": [1, 2], "END": -1}}
    right = spec.run(gpt2, clean, corrupted, metric, **options)
    side = gpt2.tokenizer.padding_side
    gpt2.tokenizer.padding_side = "left"
    try:
        left = spec.run(gpt2, clean, corrupted, metric, **options)
    finally:
        gpt2.tokenizer.padding_side = side
    assert (left.values == right.values).all()
    assert list(left.pos_token.values) == ["w1|w5", "w3|w8"]


def test_selected_names_dataframe_and_labels(gpt2):
    """sel(pos=names) picks and orders names; a DataFrame works like a dict; labels ride along."""
    clean, corrupted = rows(3), rows(4)
    table = pd.DataFrame({"S": POSITIONS["S"], "END": [n - 1 for n in LENGTHS]})
    options = {"engine": "reference", "progress": False}
    metric = metrics.logit_diff(5, 7, pos=last_positions(corrupted), reduce="none")
    every = catalog.RESID_PRE.run(
        gpt2, padded(clean), padded(corrupted), metric, positions=table, **options
    )
    some = catalog.RESID_PRE.sel(pos=["END", "S"]).run(
        gpt2, padded(clean), padded(corrupted), metric, positions=POSITIONS, **options
    )
    assert list(every.pos.values) == ["S", "END"] and list(some.pos.values) == ["END", "S"]
    assert (every.sel(pos=["END", "S"]).values == some.values).all()
    words = [
        [VOCAB[clean[b][i]] for b, i in enumerate(ix)]
        for ix in (POSITIONS["S"], last_positions(clean))
    ]
    assert list(every.pos_token.values) == ["|".join(dict.fromkeys(w)) for w in words]
    assert every.attrs["positions"]["clean"] == {"S": [2, 3, 1], "END": [4, 6, 5]}


def test_integer_positions_still_sweep_integers(gpt2):
    """With positions given, an explicit integer restriction keeps integer coordinates."""
    clean, corrupted = rows(3), rows(4)
    result = catalog.RESID_PRE.sel(pos=slice(0, 3)).run(
        gpt2,
        padded(clean),
        padded(corrupted),
        lambda logits: logits[:, 0, 5].mean(),
        engine="reference",
        positions=POSITIONS,
    )
    assert list(result.pos.values) == [0, 1, 2] and "pos_token" in result.coords


def test_per_example_selections_in_the_plan():
    """A name whose index differs by prompt becomes a PerExample selection; equal ones stay ints."""
    sizes = Sizes(n_layers=2, n_heads=4, n_kv_heads=4, d_model=8, d_head=2, d_mlp=6, batch=3, seq=7)
    positions = resolve_positions(
        {"S": [2, 3, 1], "BOS": 0}, lengths={"clean": LENGTHS, "corrupted": LENGTHS}
    )
    p = compile(catalog.RESID_PRE.sel(layer=0), sizes, positions=positions)
    assert p.coords["pos"] == ("S", "BOS")
    s_index = dict(p.cell(0).regions[0].index)["pos"]
    bos_index = dict(p.cell(1).regions[0].index)["pos"]
    assert s_index == PerExample(((2,), (3,), (1,))) and bos_index == (0,)


def test_left_padding_offsets_shift_names():
    """With left padding, indices (and negative ones) shift by each prompt's leading pads."""
    positions = resolve_positions(
        {"S": [1, 2], "END": -1},
        lengths={"clean": [3, 5], "corrupted": [3, 5]},
        offsets={"clean": [2, 0], "corrupted": [2, 0]},
    )
    assert positions.clean == {"S": (3, 2), "END": (4, 4)}


# --- errors ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two(gpt2):
    """Two right-padded prompts of lengths 5 and 7."""
    return padded(rows(5, (5, 7))), padded(rows(6, (5, 7)))


@pytest.mark.parametrize(
    ("spec", "positions", "error", "message"),
    [
        (
            catalog.RESID_PRE.sel(pos="S3"),
            {"S2": [1, 2]},
            SpecError,
            r"restriction pos='S3' in spec 'resid_pre' is not a named position; the named positions are S2; did you mean 'S2'\?",
        ),
        (
            catalog.RESID_PRE.sel(pos="S2"),
            None,
            SpecError,
            r"names a position, but the sweep got no positions; pass positions=\{'S2'",
        ),
        (
            catalog.RESID_PRE,
            {"S2": [1, 2, 3]},
            InputError,
            r"positions\['S2'\] has 3 entries but there are 2 prompts",
        ),
        (
            catalog.RESID_PRE,
            ({"S2": [1, 2], "IO": 1}, {"S2": [1, 2]}),
            InputError,
            r"must name the same positions; only in clean: \['IO'\], only in corrupted: \[\]",
        ),
        (
            catalog.RESID_PRE,
            ({"S2": [1, 2]}, {"S2": [1]}),
            InputError,
            r"corrupted positions\['S2'\] has 1 entries but there are 2 prompts",
        ),
        (
            catalog.RESID_PRE,
            {"S2": [1, 7]},
            InputError,
            r"positions\['S2'\]\[1\] = 7 is outside clean prompt 1, which has 7 tokens",
        ),
        (
            catalog.RESID_PRE,
            {"S2": [5, 1]},
            InputError,
            r"positions\['S2'\]\[0\] = 5 is outside clean prompt 0, which has 5 tokens \(valid: -5..4",
        ),
        (
            catalog.RESID_PRE,
            {"S2": [2.5, 1]},
            InputError,
            r"positions\['S2'\]\[0\] = 2.5 must be an int token index",
        ),
        (
            catalog.RESID_PRE,
            {"S2": "x"},
            InputError,
            r"positions\['S2'\] must be an int or a list of one int per prompt",
        ),
        (catalog.RESID_PRE, [1, 2], InputError, r"must map each name to one index per prompt"),
        (catalog.RESID_PRE, ({}, {}, {}), InputError, r"a pair \(clean, corrupted\), got 3 tables"),
        (catalog.RESID_PRE, {}, InputError, r"positions names no positions"),
    ],
)
def test_bad_positions_are_clear_errors(gpt2, two, spec, positions, error, message):
    """Unknown names, missing tables, wrong sizes and out-of-range indices name what is wrong."""
    with pytest.raises(error, match=message):
        spec.run(
            gpt2,
            *two,
            lambda logits: logits[:, 0, 5].mean(),
            engine="reference",
            positions=positions,
        )


def test_left_padded_tokens_are_refused(gpt2):
    """Left-padded tokens (told by their mask) would run without an attention mask: an error."""
    tokens = torch.tensor([[PAD, PAD, 0, 5, 6], [0, 7, 8, 9, 10]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    with pytest.raises(
        InputError, match=r"corrupted prompt 0 is left-padded \(its attention mask starts with 2 zeros\)"
    ):
        catalog.RESID_PRE.run(
            gpt2,
            tokens,
            {"input_ids": tokens, "attention_mask": mask},
            metrics.logit_diff(5, 7),
            engine="reference",
        )


@pytest.mark.parametrize(
    ("restrictions", "message"),
    [
        ({"pos": ("S2", 3)}, r"restriction pos=\('S2', 3\) mixes position names and ints"),
        ({"head": "S2"}, r"restriction head='S2' must be an int, a list of ints or a slice"),
        ({"pos": 1.5}, r"restriction pos=1.5 must be an int or a position name"),
    ],
)
def test_bad_named_restrictions(restrictions, message):
    """Names only fit position dims, and are not mixed with ints."""
    with pytest.raises(SpecError, match=message):
        PatchSpec("z", axes=("layer",), restrictions=restrictions)


def test_named_specs_round_trip():
    """Specs restricted by name survive to_dict -> JSON -> from_dict and repr -> eval."""
    spec = SPECS["pattern_named"]
    assert PatchSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    assert eval(repr(spec), {"PatchSpec": PatchSpec}) == spec
    assert catalog.HEAD_OUT.sel(pos="END").to_dict()["restrictions"] == {"pos": "END"}
