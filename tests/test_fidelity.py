"""Layout fidelity (fastvq/pipeline/fidelity.py): the texture classifier learns the embedded textures,
the measure is high for a real mosaic under its own layout and low under a wrong one, and bad
arguments are refused by name."""
import math

import pytest
import torch

from fastvq.pipeline.conditions import LayoutMosaics
from fastvq.pipeline.fidelity import (TextureClassifier, heldout_accuracy, heldout_mosaic_fidelity, layout_fidelity,
                                      layout_majority, patch_labels, train_texture_classifier)

CLASSES = ("brick", "grass", "gravel")
# Small and fast (well under a second on one core), yet far above chance on these textures.
FAST = {"patch": 24, "width": 8, "steps": 150, "batch_size": 32, "seed": 1}


@pytest.fixture(scope="module")
def classifier():
    return train_texture_classifier(CLASSES, **FAST)


@pytest.fixture(scope="module")
def mosaics():
    """Four real held-out mosaics of 96 pixels and their layouts."""
    data = LayoutMosaics(96, "heldout", textures=CLASSES, length=4)
    images, layouts = zip(*(data[i] for i in range(len(data))))
    return torch.stack(images), torch.stack(layouts)


def test_classifier_learns_the_textures_on_held_out_crops(classifier):
    accuracy = heldout_accuracy(classifier)
    assert accuracy["mean"] > 0.75  # chance is 1/3
    assert all(accuracy[name] > 0.5 for name in CLASSES)
    assert not classifier.training and not any(p.requires_grad for p in classifier.parameters())


def test_classifier_never_trains_on_the_held_out_strip(classifier):
    held = LayoutMosaics(96, "heldout", textures=CLASSES)
    for (_, trained_to), (strip_from, _) in zip(classifier.train_columns, held.columns):
        assert trained_to <= strip_from


def test_training_is_reproducible_and_leaves_the_thread_count(classifier):
    threads = torch.get_num_threads()
    again = train_texture_classifier(CLASSES, **FAST)
    assert torch.get_num_threads() == threads
    for a, b in zip(classifier.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)


def test_real_mosaics_under_their_own_layout_score_high(classifier, mosaics):
    images, layouts = mosaics
    result = layout_fidelity(classifier, images, layouts)
    assert result["mean"] > 0.75
    assert sum(result["counted"].values()) > 50
    ceiling = heldout_mosaic_fidelity(classifier, count=4)  # the same mosaics (held-out items depend on i only)
    assert ceiling["per_class"] == result["per_class"]


def test_a_wrong_layout_scores_low(classifier, mosaics):
    images, layouts = mosaics
    right = layout_fidelity(classifier, images, layouts)
    wrong = layout_fidelity(classifier, images, (layouts + 1) % len(CLASSES))  # every class named as another
    assert wrong["mean"] < 0.3 < right["mean"] - 0.4
    swapped = layout_fidelity(classifier, images, layouts.flip(-1))  # right classes, wrong places
    assert swapped["mean"] < right["mean"] - 0.1


def test_per_class_agreement_counts_only_pure_patches(classifier):
    image = LayoutMosaics(48, "heldout", textures=CLASSES, length=1)[0][0]
    layout = torch.zeros(48, 48, dtype=torch.int64)
    layout[:, 30:] = 2  # brick left of column 30, gravel right of it, no grass
    result = layout_fidelity(classifier, image, layout, stride=6, purity=1.0)
    majority, counted = layout_majority(layout[None], 3, 24, 6, 1.0)
    # patches start at columns 0, 6, ..., 24: pure brick while they end by column 30 (starts 0, 6), none pure gravel
    assert counted[0].sum(1).tolist() == [2] * 5 and (majority[counted] == 0).all()
    assert result["counted"] == {"brick": 10, "grass": 0, "gravel": 0}
    assert math.isnan(result["per_class"]["grass"]) and result["mean"] == result["per_class"]["brick"]
    assert patch_labels(classifier, image, stride=6).shape == (1, 5, 5)


def test_ceiling_through_a_function(classifier):
    flat = heldout_mosaic_fidelity(classifier, count=2, through=lambda x: torch.zeros_like(x))
    labels = [v for v in flat["per_class"].values() if not math.isnan(v)]
    assert all(v in (0.0, 1.0) for v in labels)  # a blank picture is one texture or none, everywhere


def test_a_classifier_through_a_codec_learns_the_textures_as_the_codec_draws_them():
    seen = []

    def invert(images):  # a "codec" no real texture survives unchanged: every pixel's negative
        seen.append(tuple(images.shape))
        return -images

    codec = train_texture_classifier(CLASSES, **FAST, through=invert)
    assert codec.through is invert
    assert len(seen) == len(CLASSES)  # each texture's training region once, not each crop
    assert all(h % 16 == 0 and w % 16 == 0 and b == 1 for b, _, h, w in seen)
    assert heldout_accuracy(codec)["mean"] > 0.8  # the held-out strip goes through the codec too
    inverted = heldout_mosaic_fidelity(codec, count=4, through=invert)
    assert inverted["mean"] > 0.8


@pytest.mark.parametrize("through", ["reconstruct", lambda x: x[..., :-1]])
def test_a_bad_codec_is_refused_by_name(through):
    with pytest.raises(ValueError, match="through"):
        train_texture_classifier(CLASSES, **FAST, through=through)


@pytest.mark.parametrize("call, name", [
    (lambda m, x, l: layout_fidelity(m, x, l, stride=0), "stride"),
    (lambda m, x, l: layout_fidelity(m, x, l, purity=0.5), "purity"),
    (lambda m, x, l: layout_fidelity(m, x, l, purity=1.5), "purity"),
    (lambda m, x, l: layout_fidelity(m, x, l[..., :-1]), "layouts"),
    (lambda m, x, l: layout_fidelity(m, x, l.float()), "layouts"),
    (lambda m, x, l: layout_fidelity(m, x, l + 3), "layouts"),
    (lambda m, x, l: layout_fidelity(m, x[:, :1], l), "images"),
    (lambda m, x, l: layout_fidelity(m, x[..., :16, :16], l[..., :16, :16]), "images"),
    (lambda m, x, l: patch_labels(m, x, stride=-1), "stride"),
    (lambda m, x, l: heldout_mosaic_fidelity(m, count=0), "count"),
    (lambda m, x, l: heldout_mosaic_fidelity(m, size=8), "size"),
    (lambda m, x, l: heldout_mosaic_fidelity(m, size=200), "size 200"),  # its strip reaches the training columns
    (lambda m, x, l: heldout_mosaic_fidelity(m, through="reconstruct"), "through"),
    (lambda m, x, l: train_texture_classifier(CLASSES, steps=0), "steps"),
    (lambda m, x, l: train_texture_classifier(CLASSES, patch=2), "patch"),
    (lambda m, x, l: train_texture_classifier(CLASSES, lr=0.0), "lr"),
    (lambda m, x, l: train_texture_classifier(("brick",)), "classes"),
    (lambda m, x, l: train_texture_classifier("brick"), "classes"),
    (lambda m, x, l: TextureClassifier(CLASSES, width=0), "width"),
])
def test_bad_arguments_are_named(classifier, mosaics, call, name):
    images, layouts = mosaics
    with pytest.raises(ValueError, match=name):
        call(classifier, images, layouts)
