"""fastvq.pipeline.data: item convention, the region split, reproducible crops, folders and errors."""
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Subset
from torch.utils.data.distributed import DistributedSampler

from fastvq.pipeline.data import (DEFAULT_IMAGES, EMBEDDED_IMAGES, EmbeddedImages, ImageFolder, make_dataset,
                                  num_classes)


def coordinate_image(path, height=40, width=100):
    """An RGB png whose red channel is the column index and green channel the row index."""
    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    pixels = np.stack([cols, rows, np.zeros_like(cols)], axis=-1).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def to_uint8(image):
    return ((image + 1) * 127.5).round().to(torch.int64)


@pytest.fixture(scope="module")
def textures():
    return EmbeddedImages(32, "train", length=60), EmbeddedImages(32, "heldout")


def test_items_are_image_label_tuples(textures):
    for dataset in textures:
        image, label = dataset[len(dataset) - 1]
        assert image.shape == (3, 32, 32) and image.dtype == torch.float32
        assert image.min() >= -1 and image.max() <= 1
        assert isinstance(label, int) and 0 <= label < 3
    assert textures[0].classes == list(DEFAULT_IMAGES) and num_classes(textures[0]) == 3
    assert num_classes(Subset(textures[1], [0, 1])) == 3
    with pytest.raises(IndexError):
        textures[0][60]


def test_train_labels_cycle_through_images(textures):
    assert [textures[0][i][1] for i in range(6)] == [0, 1, 2, 0, 1, 2]


def test_grayscale_textures_become_rgb_and_heldout_is_the_right_strip(textures):
    from skimage import data

    brick = torch.from_numpy(data.brick()).long()  # 512 x 512 grey
    heldout = textures[1]
    # the strip is the right-most ceil(0.2 * 512) = 103 columns: three 32-wide columns of crops, 16 rows
    assert heldout.train_widths == [409, 409, 409] and len(heldout) == 3 * 16 * 3
    image, label = heldout[0]
    assert label == 0
    expected = brick[:32, 409:441]
    assert torch.equal(to_uint8(image), expected.expand(3, -1, -1))


def test_train_and_heldout_regions_are_disjoint(tmp_path):
    coordinate_image(tmp_path / "a.png")  # 40 x 100: the held-out strip is the right-most 20 columns
    train = ImageFolder(tmp_path, 16, "train", length=200)
    heldout = ImageFolder(tmp_path, 16, "heldout")
    assert train.train_widths == [80]
    train_columns = torch.cat([to_uint8(train[i][0])[0].flatten() for i in range(len(train))]).unique()
    heldout_columns = torch.cat([to_uint8(heldout[i][0])[0].flatten() for i in range(len(heldout))]).unique()
    assert train_columns.min() == 0 and train_columns.max() == 79  # 200 crops reach both edges
    assert heldout_columns.min() == 80
    assert len(heldout) == 2  # rows 0..15 and 16..31, columns 80..95
    # a strip narrower than a crop is widened to one crop
    assert ImageFolder(tmp_path, 32, "heldout").train_widths == [68]


def test_train_crops_flip_both_ways_and_only_when_asked(tmp_path):
    coordinate_image(tmp_path / "a.png")

    def directions(dataset):
        found = set()
        for i in range(len(dataset)):
            image = to_uint8(dataset[i][0])
            found.add((bool(image[0, 0, 1] < image[0, 0, 0]), bool(image[1, 1, 0] < image[1, 0, 0])))
        return found

    assert directions(ImageFolder(tmp_path, 8, length=64)) == {(h, v) for h in (False, True) for v in (False, True)}
    assert directions(ImageFolder(tmp_path, 8, length=64, flips=False)) == {(False, False)}


def test_crops_depend_on_seed_epoch_and_index_only(textures):
    train = textures[0]
    again = EmbeddedImages(32, "train", length=60)
    assert all(torch.equal(train[i][0], again[i][0]) for i in (0, 5, 59))
    assert not torch.equal(train[0][0], train[3][0])  # same image, another crop
    assert not torch.equal(train[0][0], EmbeddedImages(32, "train", length=60, seed=1)[0][0])
    again.set_epoch(1)
    assert not torch.equal(train[0][0], again[0][0])
    again.set_epoch(0)
    assert torch.equal(train[0][0], again[0][0])
    with pytest.raises(ValueError, match="epoch"):
        again.set_epoch(-1)


def test_heldout_length_keeps_evenly_spaced_crops(textures):
    full = textures[1]
    few = EmbeddedImages(32, "heldout", length=5)
    assert len(few) == 5
    assert few.crops == [full.crops[k] for k in (0, 36, 72, 107, 143)]
    assert len(EmbeddedImages(32, "heldout", length=10_000)) == len(full)


def test_scale_resizes_once_at_load():
    half = EmbeddedImages(16, "heldout", names=["astronaut"], scale=0.5)
    assert half.images[0].shape == (3, 256, 256) and half.images[0].dtype == torch.uint8


def test_every_listed_embedded_image_loads_offline():
    everything = EmbeddedImages(32, "heldout", names=EMBEDDED_IMAGES, scale=0.25)
    assert everything.classes == list(EMBEDDED_IMAGES)
    assert sorted({label for _, label in (everything[i] for i in range(len(everything)))}) == list(range(len(EMBEDDED_IMAGES)))


def test_loader_and_distributed_sampler(textures):
    train = textures[0]
    images, labels = next(iter(DataLoader(train, batch_size=8, num_workers=0)))
    assert images.shape == (8, 3, 32, 32) and labels.dtype == torch.int64
    ranks = [list(DistributedSampler(train, num_replicas=2, rank=r, shuffle=True, seed=0)) for r in (0, 1)]
    assert not set(ranks[0]) & set(ranks[1])
    assert not torch.equal(train[ranks[0][0]][0], train[ranks[1][0]][0])


def test_image_folder_labels_are_top_level_subfolders(tmp_path):
    coordinate_image(tmp_path / "dogs" / "deep" / "x.jpg")
    coordinate_image(tmp_path / "cats" / "y.PNG")
    coordinate_image(tmp_path / "z.bmp")
    (tmp_path / "notes.txt").write_text("not an image")
    dataset = ImageFolder(tmp_path, 16, "heldout")
    assert dataset.classes == ["", "cats", "dogs"]
    assert dataset.labels == [1, 2, 0]  # files sorted: cats/y.PNG, dogs/deep/x.jpg, z.bmp
    assert [p.rsplit("/", 1)[-1] for p in dataset.sources] == ["y.PNG", "x.jpg", "z.bmp"]


def test_flat_folder_is_one_class(tmp_path):
    coordinate_image(tmp_path / "a.png")
    coordinate_image(tmp_path / "b.webp")
    dataset = ImageFolder(tmp_path, 16)
    assert dataset.classes == [""] and {dataset[i][1] for i in range(len(dataset))} == {0}


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing"):
        ImageFolder(tmp_path / "missing", 16)
    with pytest.raises(ValueError, match="no images"):
        ImageFolder(tmp_path, 16)
    coordinate_image(tmp_path / "small.png", height=40, width=40)
    with pytest.raises(ValueError, match="small.png is 40 x 40"):
        ImageFolder(tmp_path, 32)
    (tmp_path / "small.png").unlink()
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match="cannot decode image .*broken.jpg"):
        ImageFolder(tmp_path, 16)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="split"):
        EmbeddedImages(32, "test")
    with pytest.raises(ValueError, match="size"):
        EmbeddedImages(0)
    with pytest.raises(ValueError, match="unknown: \\['eagle'\\]"):
        EmbeddedImages(32, names=["brick", "eagle"])
    with pytest.raises(ValueError, match="scale"):
        EmbeddedImages(32, scale=0)
    with pytest.raises(ValueError, match="brick is 128 x 128"):
        EmbeddedImages(100, names=["brick"], scale=0.25)


def test_make_dataset(tmp_path):
    assert make_dataset(None, 32, "heldout").classes == list(DEFAULT_IMAGES)
    assert make_dataset("embedded", 32, "train", length=4).classes == list(DEFAULT_IMAGES)
    assert make_dataset("embedded:coffee, brick", 32, "heldout", scale=0.5).classes == ["coffee", "brick"]
    coordinate_image(tmp_path / "a.png")
    assert isinstance(make_dataset(str(tmp_path), 16, "train"), ImageFolder)
    with pytest.raises(ValueError, match="embedded:NAME.*existing directory"):
        make_dataset(str(tmp_path / "nowhere"), 16, "train")
    with pytest.raises(ValueError, match="unknown"):
        make_dataset("embedded:lena", 16, "train")
