"""Drawing predictions: instance masks (a colour per instance, outline, box and caption) and semantic maps (palette
blended over the image, legend)."""

from __future__ import annotations

import numpy as np
import pytest

from detkit.utils.draw import LEGEND_ROW, colour, draw_detections, draw_semantic


def test_colours_stay_distinct_for_many_classes():
    colours = [colour(i) for i in range(160)]
    assert len(set(colours)) == 160
    assert all(0 <= c <= 255 for rgb in colours for c in rgb)


def test_instance_masks_get_their_own_colour_outline_box_and_caption():
    image = np.zeros((60, 80, 3), np.uint8)
    masks = np.zeros((2, 60, 80), np.uint8)
    masks[0, 20:40, 10:30] = 1
    masks[1, 25:45, 45:70] = 1
    boxes = np.array([[10, 20, 30, 40], [45, 25, 70, 45]], np.float32)
    drawn = np.asarray(draw_detections(image, boxes, [1, 1], ["person"], [0.9, 0.8], masks=masks))
    for i, (y, x) in enumerate([(30, 10), (35, 45)]):  # a pixel on each mask's left edge (and box)
        assert tuple(drawn[y, x]) == colour(i)
    # the interior is blended (not the full colour, not the black image), two instances of one class differ
    inside0, inside1 = drawn[30, 20].astype(int), drawn[35, 57].astype(int)
    assert 0 < inside0.sum() < sum(colour(0)) and not np.array_equal(inside0, inside1)
    # outside every mask and box the image is untouched
    assert drawn[55, 5].sum() == 0
    # caption boxes above each box in the instance's colour
    assert tuple(drawn[15, 12]) == colour(0) and tuple(drawn[20, 47]) == colour(1)


def test_boxes_without_masks_take_the_class_colour():
    image = np.zeros((40, 40, 3), np.uint8)
    drawn = np.asarray(draw_detections(image, np.array([[5, 15, 30, 35]]), [3], ["a", "b", "c"]))
    assert tuple(drawn[25, 5]) == colour(3)


def test_semantic_map_palette_and_legend():
    image = np.full((80, 120, 3), 200, np.uint8)
    sem = np.full((80, 120), 255, np.int64)
    sem[40:, :60] = 0  # 25 % background
    sem[40:, 60:] = 2  # 25 % "car"
    sem[:40, 100:] = 1  # small
    drawn = np.asarray(draw_semantic(image, sem, ["road", "person", "car"], alpha=0.5))
    expected = (np.full(3, 200.0) * 0.5 + np.asarray(colour(2)) * 0.5).astype(np.uint8)
    assert np.array_equal(drawn[70, 100], expected)  # a labelled pixel, away from the legend
    assert np.array_equal(drawn[30, 95], [200, 200, 200])  # unlabeled pixels are left as they are
    # the legend: one swatch per class present, largest first (road and car tie at 25 %, then person)
    swatches = [tuple(drawn[2 + row * LEGEND_ROW + 5, 7]) for row in range(3)]
    assert set(swatches[:2]) == {colour(0), colour(2)} and swatches[2] == colour(1)
    assert tuple(drawn[2 + 3 * LEGEND_ROW + 6, 7]) != colour(0)  # no fourth row


def test_semantic_map_of_another_size_is_an_error():
    with pytest.raises(ValueError, match="differ in size"):
        draw_semantic(np.zeros((10, 10, 3), np.uint8), np.zeros((5, 10), np.int64), ["a"])
