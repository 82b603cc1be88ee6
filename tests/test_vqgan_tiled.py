"""VQGAN.decode_tiled: one tile is decode exactly; several tiles blend to weights that sum to 1
(exact for a local decoder), stay within a stated distance of the untiled decode with a random
tiny VQGAN and show no seam; bad arguments are refused; peak memory stays one tile's."""
import pytest
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from fastvq.models.vqgan import VQGAN, VQGANConfig

# Tiny, like tests/test_vqgan.py's: f = 2, attention at the 8x8 level besides mid.
CONFIG = dict(resolution=16, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), z_channels=8,
              n_embed=32, embed_dim=4)
F_ = 2  # downsampling factor of CONFIG


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return VQGAN(VQGANConfig(**CONFIG)).eval()


def codes(shape, seed=1):
    return torch.randint(0, CONFIG["n_embed"], shape, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_one_tile_is_decode_exactly(model):
    idx = codes((2, 12, 10))
    full = model.decode_indices(idx)
    calls = []
    for tile in (12, (12, 10), 40):
        assert torch.equal(model.decode_tiled(idx, tile=tile, callback=lambda *a: calls.append(a)), full)
    assert calls == [(1, 1)] * 3
    z_q = model.quantize.get_codebook_entry(idx.reshape(-1), (2, 12, 10, CONFIG["embed_dim"]))
    assert torch.equal(model.decode_tiled(z_q, tile=16), model.decode(z_q))  # code vectors in, too
    assert torch.equal(model.decode_tiled(idx), full)  # the default tile (32) covers it


@pytest.mark.parametrize("shape, tile, overlap", [
    ((2, 29, 13), 8, 3), ((1, 40, 8), (12, 8), 4), ((1, 17, 23), 5, 0), ((1, 9, 30), 4, 3), ((1, 33, 7), (10, 3), 2),
])
@torch.no_grad()
def test_blend_weights_sum_to_one_so_a_local_decoder_tiles_exactly(shape, tile, overlap):
    """With a decoder that only upsamples (each pixel sees its own code), tiling must change
    nothing: every pixel is a convex mix of identical values, so the weights sum to 1 everywhere,
    and each tile lands where it belongs."""
    torch.manual_seed(0)
    model = VQGAN(VQGANConfig(**CONFIG)).eval()
    model.post_quant_conv, model.decoder = nn.Identity(), nn.Upsample(scale_factor=F_)
    z = torch.randn(shape[0], CONFIG["embed_dim"], *shape[1:], dtype=torch.float64)
    calls = []
    tiled = model.decode_tiled(z, tile=tile, overlap=overlap, callback=lambda *a: calls.append(a))
    torch.testing.assert_close(tiled, model.decode(z), rtol=1e-12, atol=1e-12)
    total = calls[-1][1]
    assert total > 1 and calls == [(i, total) for i in range(1, total + 1)]


def row_energy(x):
    """Mean squared vertical step between pixel rows r and r + 1, per r."""
    return (x[:, :, 1:] - x[:, :, :-1]).pow(2).mean(dim=(0, 1, 3))


@torch.no_grad()
def test_several_tiles_stay_close_to_untiled_and_show_no_seam(model):
    """Tiles of 32 codes with 8 shared, on a 64 x 64 grid: 3 x 3 windows starting at 0, 16, 32.

    The decoder is not local (GroupNorm statistics and attention are per tile), so the result is
    not the untiled decode. Measured with this random tiny VQGAN (image std 0.29): mean |error|
    0.087, max 1.6 (tile 16: 0.17, tile 48: 0.039: the error falls as tiles grow). A random
    decoder is far more sensitive to its window's statistics than a trained one (a 600-step demo
    VQGAN: 0.007 mean, 0.07 max at tile 32 on a 48-code grid), so the bounds below are loose.
    Seams: the squared vertical / horizontal step at the band rows / columns, relative to the
    untiled image's there, is compared with the same ratio elsewhere: a hard seam (overlap 0)
    stands out (22x here), the blended one does not (1.6x)."""
    idx = codes((1, 64, 64))
    full = model.decode_indices(idx)
    errors = {}
    for tile in (16, 32, 48):
        errors[tile] = (model.decode_tiled(idx, tile=tile, overlap=8) - full).abs()
    err = errors[32]
    print(f"tiled vs untiled, tile 32 overlap 8: mean {err.mean():.4f} max {err.max():.4f} "
          f"(image std {full.std():.3f}); tile 16: {errors[16].mean():.4f}, tile 48: {errors[48].mean():.4f}")
    assert err.mean() < 0.12 and err.max() < 2.5
    assert errors[48].mean() < errors[32].mean() < errors[16].mean()

    def seam_excess(tiled, bands):
        ratios = []
        for image, reference in ((tiled, full), (tiled.transpose(2, 3), full.transpose(2, 3))):  # rows, then columns
            e = row_energy(image) / row_energy(reference)
            seam = torch.zeros_like(e, dtype=torch.bool)
            for lo, hi in bands:  # pixel steps r between r and r + 1 that touch a band
                seam[lo * F_ - 1:max(hi * F_, lo * F_ + 1)] = True
            elsewhere = ~seam
            elsewhere[:8] = elsewhere[-8:] = False  # the image's own border
            ratios.append((e[seam].mean() / e[elsewhere].mean()).item())
        return max(ratios)

    blended = seam_excess(model.decode_tiled(idx, tile=32, overlap=8), [(16, 32), (32, 48)])
    hard = seam_excess(model.decode_tiled(idx, tile=32, overlap=0), [(32, 32)])
    print(f"seam energy / elsewhere: blended {blended:.2f}, hard seam {hard:.2f}")
    assert hard > 5  # the measure sees a seam where there is one
    assert blended < 2.5


def peak_bytes(fn):
    """Peak of the bytes torch's CPU allocator holds while fn runs, from the profiler's memory
    records (allocations and frees in time order)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    current = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        current += event.self_cpu_memory_usage
        peak = max(peak, current)
    return peak


@torch.no_grad()
def test_peak_memory_is_one_tile_however_tall(model):
    short, tall = codes((1, 16, 8)), codes((1, 64, 8))
    tiled = {rows: peak_bytes(lambda: model.decode_tiled(idx, tile=8, overlap=2))
             for rows, idx in ((16, short), (64, tall))}
    untiled = {rows: peak_bytes(lambda: model.decode_indices(idx)) for rows, idx in ((16, short), (64, tall))}
    print(f"peak bytes, 16 -> 64 rows: tiled {tiled[16]} -> {tiled[64]}, untiled {untiled[16]} -> {untiled[64]}")
    assert untiled[64] > 3 * untiled[16]  # the measure sees the growth of an untiled decode
    out_growth = 3 * (64 - 16) * 8 * F_ * F_ * 4  # the larger output image itself
    assert tiled[64] < 1.1 * tiled[16] + out_growth


@torch.no_grad()
def test_memory_budget_chooses_the_tile(model):
    fixed, per_code = model.decode_memory_per_code()
    assert per_code > 0 and fixed >= 0
    assert model.decode_memory_per_code() == (fixed, per_code)  # measured once
    idx = codes((1, 64, 8))
    out_bytes = idx.numel() * 3 * F_ * F_ * 4
    calls = {}
    for budget in (50_000, 200_000):
        tiles = []
        result = model.decode_tiled(idx, memory_budget=budget, callback=lambda done, total: tiles.append(total))
        calls[budget] = tiles[-1]
        assert result.shape == (1, 3, 64 * F_, 8 * F_)
    peak = peak_bytes(lambda: model.decode_tiled(idx, memory_budget=200_000))
    print(f"memory_budget 50000 / 200000: {calls[50_000]} / {calls[200_000]} tiles; peak at 200000: {peak} bytes "
          f"(output {out_bytes})")
    assert peak < 1.1 * 200_000 + 2 * out_bytes
    assert calls[200_000] < calls[50_000]  # a larger budget, larger (so fewer) tiles
    # full-width strips for a narrow grid: one tile when the budget holds the whole grid
    whole = model.decode_tiled(idx, memory_budget=fixed + per_code * idx.numel() * 1.01)
    assert torch.equal(whole, model.decode_indices(idx))


@pytest.mark.parametrize("kwargs, match", [
    ({"tile": 0}, "tile must be an integer >= 1"),
    ({"tile": -3}, "tile must be an integer >= 1"),
    ({"tile": (4, 0)}, "tile must be an integer >= 1"),
    ({"tile": (4, 4, 4)}, "tile must be an int >= 1 or a pair"),
    ({"tile": 2.5}, "tile must be an integer"),
    ({"tile": 8, "overlap": -1}, "overlap must be an integer >= 0"),
    ({"tile": 8, "overlap": 8}, "overlap must be smaller than the tile"),
    ({"tile": (8, 4), "overlap": 5}, "overlap must be smaller than the tile"),
    ({"tile": 8, "memory_budget": 10**6}, "give tile or memory_budget, not both"),
    ({"memory_budget": 0}, "memory_budget must be a positive number"),
    ({"memory_budget": True}, "memory_budget must be a positive number"),
    ({"memory_budget": 10}, "memory_budget of 10 bytes is too small"),
    ({"callback": 3}, "callback must be callable"),
])
def test_bad_arguments_are_refused_naming_them(model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        model.decode_tiled(codes((1, 12, 12)), **kwargs)


def test_bad_inputs_are_refused(model):
    with pytest.raises(ValueError, match="codes must be code indices"):
        model.decode_tiled(torch.zeros(12, 12, dtype=torch.long))
    with pytest.raises(ValueError, match=r"must lie in \[0, 32\)"):
        model.decode_tiled(torch.full((1, 4, 4), 32))
    with pytest.raises(ValueError, match="z_q must be a non-empty"):
        model.decode_tiled(torch.zeros(1, 3, 4, 4))


@torch.no_grad()
@torch.no_grad()
def test_tiles_per_call_batches_windows_with_the_same_result(model):
    idx = codes((2, 40, 20))
    one = model.decode_tiled(idx, tile=12, overlap=4)
    calls = []
    batched = model.decode_tiled(idx, tile=12, overlap=4, tiles_per_call=4, callback=lambda *a: calls.append(a))
    torch.testing.assert_close(batched, one, rtol=1e-5, atol=1e-5)
    total = 5 * 2  # windows: 5 down, 2 across
    assert calls == [(4, total), (8, total), (10, total)]
    with pytest.raises(ValueError, match="tiles_per_call must be an integer >= 1"):
        model.decode_tiled(idx, tile=12, tiles_per_call=0)


def test_sampler_decodes_large_grids_in_tiles_within_its_memory(model):
    from fastvq.pipeline.sample import DECODE_TILE, decode_codes

    small = codes((2, DECODE_TILE, 8))
    assert torch.equal(decode_codes(model, small), model.decode_indices(small))  # within one tile: whole
    fixed, per_code = model.decode_memory_per_code()
    tall = codes((5, 40, 8))  # tile 16: strips of 16 x 8 codes, 3 per image
    with torch.no_grad():
        reference = model.decode_tiled(tall, tile=16)
        for per_call, calls_expected in ((2, 3 * 3), (6, 1 * 3), (40, 1)):  # image-tiles a call -> calls
            calls = []
            memory = fixed + per_code * 16 * 8 * per_call + 1
            images = decode_codes(model, tall, tile=16, memory=memory, callback=lambda *a: calls.append(a))
            torch.testing.assert_close(images, reference, rtol=1e-5, atol=1e-5)
            assert images.shape == (5, 3, 40 * F_, 8 * F_)
            assert len(calls) == calls_expected and calls[-1] == (15, 15)
            assert [done for done, _ in calls] == sorted(done for done, _ in calls)
