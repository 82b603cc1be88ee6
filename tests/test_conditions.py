"""fastvq.pipeline.conditions: layout mosaics (reproducible, region split kept), condition maps,
layout PNG files, condition files for `sample --cond`, the shipped layout, argument errors."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage

from fastvq.pipeline.conditions import (CONDITION_KINDS, EDGE_SIGMA, SHIPPED_LAYOUT_CLASSES, LayoutMosaics,
                                        cond_channels, condition_map, load_condition_file, palette,
                                        read_layout_png, save_layout_png, shipped_layout, vq_letters_layout)
from fastvq.pipeline.data import DEFAULT_IMAGES, EmbeddedImages

SCALE = 0.25  # the textures at 128 x 128: quick to load, room for 16- and 32-pixel crops


@pytest.fixture(scope="module")
def mosaics():
    return LayoutMosaics(32, "train", length=40, scale=SCALE), LayoutMosaics(32, "heldout", length=20, scale=SCALE)


def items(dataset, n=None):
    return [dataset[i] for i in range(len(dataset) if n is None else n)]


def same(a, b):
    return all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))


def test_items_are_image_layout_pairs(mosaics):
    for dataset in mosaics:
        assert dataset.classes == list(DEFAULT_IMAGES)
        for image, layout in items(dataset, 10):
            assert image.shape == (3, 32, 32) and image.dtype == torch.float32
            assert image.min() >= -1 and image.max() <= 1
            assert layout.shape == (32, 32) and layout.dtype == torch.int64
            assert layout.min() >= 0 and layout.max() < 3
    assert len(mosaics[0]) == 40 and len(mosaics[1]) == 20
    with pytest.raises(IndexError):
        mosaics[0][40]


def test_items_are_a_function_of_seed_epoch_and_index(mosaics):
    train, heldout = mosaics
    again = LayoutMosaics(32, "train", length=40, scale=SCALE)
    first = items(train, 8)
    assert same(first, items(again, 8))
    assert same(first, [train[i] for i in range(8)])  # no hidden state advances between calls
    assert same(first[4:], [again[i] for i in range(4, 8)])  # nor depends on what was read before
    other_seed = LayoutMosaics(32, "train", length=40, scale=SCALE, seed=1)
    assert not any(torch.equal(a[0], b[0]) for a, b in zip(first, items(other_seed, 8)))
    held = items(heldout, 8)
    try:
        train.set_epoch(1)
        heldout.set_epoch(1)
        epoch1 = items(train, 8)
        assert not any(torch.equal(a[0], b[0]) for a, b in zip(first, epoch1))
        assert same(held, items(heldout, 8))  # the held-out set does not move with the epoch
        train.set_epoch(0)
        assert same(first, items(train, 8))
    finally:
        train.set_epoch(0)
        heldout.set_epoch(0)


def test_default_scale_fraction_and_length_are_the_embedded_datas():
    train, heldout = LayoutMosaics(32, "train", scale=SCALE), LayoutMosaics(32, "heldout", scale=SCALE)
    assert len(train) == len(EmbeddedImages(32, "train", scale=SCALE))
    assert len(heldout) == len(EmbeddedImages(32, "heldout", scale=SCALE))
    full = LayoutMosaics(32, "heldout", length=1)
    assert full.images[0].shape == (3, 512, 512)  # scale 1.0 by default
    assert full.columns[0] == (409, 512)  # the held-out strip of heldout_fraction 0.2 (see test_pipeline_data)


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_every_pixel_comes_from_its_class_texture_and_split_region(split):
    dataset = LayoutMosaics(16, split, length=60, scale=SCALE)
    train_width = EmbeddedImages(16, "train", scale=SCALE).train_widths[0]  # 128 - max(16, ceil(0.2 * 128))
    assert train_width == 102
    # Replace the textures by coordinates: red = column, green = row, blue tells the class.
    rows, cols = torch.meshgrid(torch.arange(128), torch.arange(128), indexing="ij")
    for k, image in enumerate(dataset.images):
        image.copy_(torch.stack([cols, rows, torch.full_like(cols, 40 * k + 10)]).to(torch.uint8))
    crossings = 0
    for image, layout in items(dataset):
        pixels = ((image + 1) * 127.5).round().long()
        assert torch.equal(pixels[2], 40 * layout + 10)
        if split == "train":
            assert pixels[0].max() < train_width
        else:
            assert pixels[0].min() >= train_width
        for k in layout.unique().tolist():  # one crop per class: 16 consecutive columns, in some order
            columns = pixels[0][layout == k].unique()
            assert columns.max() - columns.min() < 16
        crossings += len(layout.unique()) > 1
    assert crossings >= 20  # mosaics, not plain crops


def test_label_fields_mix_few_classes_and_region_size_sets_the_blob_size():
    def boundary_share(dataset):
        layouts = torch.stack([layout for _, layout in items(dataset)])
        return (layouts[:, :, 1:] != layouts[:, :, :-1]).float().mean().item(), layouts

    textures = ["brick", "grass", "gravel", "coins", "moon"]
    coarse, layouts = boundary_share(LayoutMosaics(32, "train", textures=textures, length=80, scale=SCALE))
    fine, _ = boundary_share(LayoutMosaics(32, "train", textures=textures, length=80, scale=SCALE, region_size=4))
    shown = [len(layout.unique()) for layout in layouts]
    assert max(shown) <= 3 and shown.count(1) < 40 and shown.count(2) + shown.count(3) > 30
    assert set(torch.cat([layout.unique() for layout in layouts]).tolist()) == set(range(5))  # every class used
    assert fine > 2.5 * coarse


def test_layout_map_is_one_hot(mosaics):
    image, layout = mosaics[0][1]
    one_hot = condition_map("layout", image, layout, 3)
    assert one_hot.shape == (3, 32, 32) and one_hot.dtype == torch.float32
    assert torch.equal(one_hot.sum(0), torch.ones(32, 32)) and torch.equal(one_hot.argmax(0), layout)
    batch = condition_map("layout", torch.stack([image, image]), torch.stack([layout, layout]), 5)
    assert batch.shape == (2, 5, 32, 32) and torch.equal(batch[1, :3], one_hot)
    assert torch.equal(condition_map("layout", None, layout, 3), one_hot)
    assert [cond_channels(kind, 7) for kind in CONDITION_KINDS] == [7, 1, 3]


def boundary_distance(layout):
    """Pixel distance of every pixel to the nearest pixel whose right or lower neighbour has another class."""
    layout = layout.numpy()
    boundary = np.zeros(layout.shape, dtype=bool)
    boundary[:, :-1] |= layout[:, 1:] != layout[:, :-1]
    boundary[:-1, :] |= layout[1:, :] != layout[:-1, :]
    return ndimage.distance_transform_edt(~boundary)


def test_edges_of_a_two_tone_mosaic_trace_the_region_boundary():
    # brick dark, grass bright, each at a fifth of its contrast: the step between the regions is
    # the strong edge, and at EDGE_SIGMA the textures' own grain stays below Canny's thresholds
    dataset = LayoutMosaics(64, "train", textures=["brick", "grass"], length=20, seed=5)
    near = total = traced = boundaries = 0
    for image, layout in items(dataset):
        two_tone = torch.where(layout == 0, image * 0.2 - 0.5, image * 0.2 + 0.5)
        edges = condition_map("edges", two_tone)
        assert edges.shape == (1, 64, 64) and set(edges.unique().tolist()) <= {0.0, 1.0}
        on_edge, distance = edges[0].bool().numpy(), boundary_distance(layout)
        near += (distance[on_edge] <= 3).sum()
        total += on_edge.sum()
        boundary = distance == 0
        if boundary.any():  # a boundary pixel is traced when an edge lies within 3 pixels of it
            traced += (ndimage.distance_transform_edt(~on_edge)[boundary] <= 3).sum()
            boundaries += boundary.sum()
    assert boundaries > 0
    assert near / total > 0.95, f"only {near / total:.0%} of the edge pixels lie near the region boundary"
    assert traced / boundaries > 0.9, f"only {traced / boundaries:.0%} of the boundary is traced"


def test_edge_sigma_keeps_each_textures_own_pattern():
    # EDGE_SIGMA's reason (see conditions.py): brick's sparse outlines vs the dense grain of grass
    # and gravel, without letting the grain fill the map
    crops = EmbeddedImages(64, "train", length=30)
    density = {label: [] for label in range(3)}
    for image, label in items(crops):
        density[label].append(condition_map("edges", image).mean().item())
    brick, grass, gravel = (float(np.mean(density[label])) for label in range(3))
    assert 0.02 < brick < 0.4 * min(grass, gravel) and max(grass, gravel) < 0.22
    assert EDGE_SIGMA == 2.0


def test_edges_of_a_constant_image_are_empty_and_batches_match():
    image = torch.full((3, 24, 40), 0.3)
    image[:, :, 20:] = -0.6  # a vertical step at column 20
    edges = condition_map("edges", torch.stack([image, torch.full((3, 24, 40), 0.3)]))
    assert edges.shape == (2, 1, 24, 40)
    assert edges[1].sum() == 0
    columns = edges[0, 0].nonzero()[:, 1]
    assert len(columns) > 10 and columns.min() >= 19 and columns.max() <= 20


def test_lowres_of_a_constant_is_constant_and_of_a_ramp_is_the_ramp():
    constant = torch.full((3, 32, 48), -0.25)
    out = condition_map("lowres", constant)
    assert out.shape == (3, 32, 48) and out.dtype == torch.float32
    torch.testing.assert_close(out, constant)
    # block means of a linear ramp are its values at block centres, and bilinear interpolation
    # between centres gives the ramp back everywhere except the half-blocks at the borders
    ramp = torch.linspace(-1, 1, 64).expand(2, 3, 16, 64)
    out = condition_map("lowres", ramp, lowres_factor=4)
    assert out.shape == (2, 3, 16, 64)
    torch.testing.assert_close(out[..., 2:-2], ramp[..., 2:-2])
    assert out.min() >= -1 and out.max() <= 1
    detail = torch.rand(3, 16, 16) * 2 - 1
    blocks = F.avg_pool2d(detail[None], 8)[0]
    # the corner pixel lies outside the first block's centre, where bilinear upsampling clamps
    assert torch.allclose(condition_map("lowres", detail)[:, 0, 0], blocks[:, 0, 0], atol=1e-6)


def test_palette_is_distinct_fixed_and_prefix_stable():
    colours = palette(300)
    assert len(set(colours)) == 300
    assert all(len(c) == 3 and all(isinstance(v, int) and 0 <= v <= 255 for v in c) for c in colours)
    assert palette(2) == colours[:2] and palette(14) == colours[:14]
    assert palette(3) == [(178, 34, 34), (34, 139, 34), (128, 128, 128)]  # brick red, grass green, gravel grey


@pytest.mark.parametrize("n_classes", [5, 300])
def test_layout_png_round_trip(tmp_path, n_classes):
    layout = torch.randint(0, n_classes, (20, 30), generator=torch.Generator().manual_seed(0))
    path = tmp_path / "layout.png"
    save_layout_png(layout, path, palette(n_classes))
    assert torch.equal(read_layout_png(path, palette(n_classes)), layout)
    with Image.open(path) as image:
        assert image.mode == ("P" if n_classes <= 256 else "RGB") and image.size == (30, 20)


def test_unknown_colour_names_file_colour_and_pixel(tmp_path):
    pixels = np.array(palette(2), dtype=np.uint8)[np.zeros((8, 10), dtype=int)]
    pixels[3, 5] = (1, 2, 3)
    pixels[6, 0] = (9, 9, 9)
    path = tmp_path / "drawn.png"
    Image.fromarray(pixels).save(path)
    with pytest.raises(ValueError, match=r"drawn\.png has colour \(1, 2, 3\) at row 3, column 5"):
        read_layout_png(path, palette(2))
    assert torch.equal(read_layout_png(path, palette(2) + [(1, 2, 3), (9, 9, 9)])[[3, 6], [5, 0]], torch.tensor([2, 3]))


def test_condition_files_give_maps_of_the_right_shape(tmp_path):
    layout = torch.randint(0, 3, (24, 40), generator=torch.Generator().manual_seed(1))
    save_layout_png(layout, tmp_path / "layout.png", palette(3))
    one_hot = load_condition_file("layout", tmp_path / "layout.png", colours=palette(3), size=(24, 40))
    assert torch.equal(one_hot, condition_map("layout", None, layout, 3))
    with pytest.raises(ValueError, match="size must equal the size of .*layout.png, 24 x 40"):
        load_condition_file("layout", tmp_path / "layout.png", colours=palette(3), size=(40, 24))
    with pytest.raises(ValueError, match="colours"):
        load_condition_file("layout", tmp_path / "layout.png")

    edges = np.zeros((24, 40), dtype=np.uint8)
    edges[10, 5:30] = 255
    edges[12, 5:30] = 100  # darker than half scale: not an edge
    Image.fromarray(edges).save(tmp_path / "edges.png")
    edge_map = load_condition_file("edges", tmp_path / "edges.png")
    assert edge_map.shape == (1, 24, 40) and edge_map.sum() == 25 and edge_map[0, 10, 5] == 1
    with pytest.raises(ValueError, match="size"):
        load_condition_file("edges", tmp_path / "edges.png", size=(24, 41))


def test_lowres_file_matches_what_training_saw(tmp_path):
    # a picture whose 8 x 8 block means are exact uint8 levels, so its low-res PNG is lossless
    levels = torch.randint(0, 256, (3, 3, 5), generator=torch.Generator().manual_seed(2))
    picture = levels.repeat_interleave(8, 1).repeat_interleave(8, 2).float() / 127.5 - 1
    Image.fromarray(levels.permute(1, 2, 0).numpy().astype(np.uint8)).save(tmp_path / "small.png")
    loaded = load_condition_file("lowres", tmp_path / "small.png", size=(24, 40))
    assert loaded.shape == (3, 24, 40)
    torch.testing.assert_close(loaded, condition_map("lowres", picture), atol=1e-5, rtol=0)
    # a larger file is averaged down to the low resolution first
    big = levels.repeat_interleave(2, 1).repeat_interleave(2, 2).permute(1, 2, 0).numpy().astype(np.uint8)
    Image.fromarray(big).save(tmp_path / "big.png")
    torch.testing.assert_close(load_condition_file("lowres", tmp_path / "big.png", size=(24, 40)), loaded)
    with pytest.raises(ValueError, match="size"):
        load_condition_file("lowres", tmp_path / "small.png")
    with pytest.raises(ValueError, match="lowres_factor"):
        load_condition_file("lowres", tmp_path / "small.png", size=(24, 40), lowres_factor=7)


def test_shipped_layout_reads_with_the_palette_and_shows_both_classes():
    path = shipped_layout()
    assert path.name == "layout_vq_letters.png" and path.stat().st_size < 8192
    assert SHIPPED_LAYOUT_CLASSES["vq_letters"] == ("brick", "grass")
    layout = read_layout_png(path, palette(2))
    assert layout.shape == (512, 512)
    assert 0.1 < (layout == 0).float().mean() < 0.5  # letters of brick on a grass background
    assert torch.equal(layout, vq_letters_layout(512))  # the file is what the script draws
    one_hot = load_condition_file("layout", path, colours=palette(3), size=(512, 512))
    assert one_hot.shape == (3, 512, 512) and one_hot[2].sum() == 0  # the demo's 3 classes read it too


def call(function, *args, **kwargs):
    return lambda: function(*args, **kwargs)


IMAGE = torch.zeros(3, 16, 16)
LAYOUT = torch.zeros(16, 16, dtype=torch.int64)
BAD_ARGUMENTS = {
    "kind": [call(cond_channels, "depth", 3), call(condition_map, "depth", IMAGE),
             call(load_condition_file, "depth", "x.png")],
    "n_classes": [call(cond_channels, "layout", 0), call(condition_map, "layout", IMAGE, LAYOUT)],
    "split": [call(LayoutMosaics, 16, "val", scale=SCALE)],
    "textures": [call(LayoutMosaics, 16, textures=["brick", "marble"], scale=SCALE),
                 call(LayoutMosaics, 16, textures="brick", scale=SCALE),
                 call(LayoutMosaics, 16, textures=["brick", "brick"], scale=SCALE)],
    "region_size": [call(LayoutMosaics, 16, scale=SCALE, region_size=0)],
    "length": [call(LayoutMosaics, 16, scale=SCALE, length=0)],
    "seed": [call(LayoutMosaics, 16, scale=SCALE, seed=-1)],
    "size": [call(LayoutMosaics, 0, scale=SCALE), call(LayoutMosaics, 128, scale=SCALE),
             call(load_condition_file, "lowres", "x.png", size=(16,))],
    "scale": [call(LayoutMosaics, 16, scale=0)],
    "heldout_fraction": [call(LayoutMosaics, 16, scale=SCALE, heldout_fraction=1.0)],
    "image": [call(condition_map, "edges", torch.zeros(1, 16, 16)),
              call(condition_map, "lowres", torch.zeros(3, 16, 16, dtype=torch.int64))],
    "layout": [call(condition_map, "layout", IMAGE, LAYOUT + 3, 3), call(condition_map, "layout", IMAGE, None, 3),
               call(condition_map, "layout", IMAGE, LAYOUT[:8], 3),
               call(condition_map, "layout", IMAGE, LAYOUT.int(), 3)],
    "lowres_factor": [call(condition_map, "lowres", IMAGE, lowres_factor=0),
                      call(condition_map, "lowres", IMAGE, lowres_factor=3)],
    "edge_sigma": [call(condition_map, "edges", IMAGE, edge_sigma=0.0)],
    "n": [call(palette, 0), call(palette, 2.0)],
    "colours": [call(save_layout_png, LAYOUT, "x.png", [(1, 2, 3), (1, 2, 3)]),
                call(read_layout_png, "x.png", [(1, 2, 256)]), call(read_layout_png, "x.png", [])],
    "name": [call(shipped_layout, "vq_numbers")],
}


@pytest.mark.parametrize("argument, bad", [(name, bad) for name, calls in BAD_ARGUMENTS.items() for bad in calls],
                         ids=[f"{name}-{i}" for name, calls in BAD_ARGUMENTS.items() for i in range(len(calls))])
def test_bad_arguments_raise_naming_the_argument(argument, bad):
    with pytest.raises(ValueError, match=rf"\b{argument}\b"):
        bad()


def test_set_epoch_checks_the_epoch(mosaics):
    with pytest.raises(ValueError, match="epoch"):
        mosaics[0].set_epoch(-1)
    assert mosaics[0].epoch == 0
