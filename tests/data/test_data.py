"""The built-in shapes dataset and the ImageFolder reader."""
import json

import numpy as np
import pytest
from PIL import Image

from zoo.data.folder import UNREADABLE, SafeImageFolder
from zoo.data.shapes import SHAPE_CLASSES, ShapesClassification, ShapesConfig, export_coco, export_segmentation, \
    render_sample
from zoo.tasks.classification import skip_unreadable_collate


def test_samples_are_deterministic_and_splits_differ():
    config = ShapesConfig(num_samples=20, img_size=48, min_objects=1, max_objects=3, seed=7)
    a, b = render_sample(config, 5), render_sample(config, 5)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.labels, b.labels)
    other = render_sample(ShapesConfig(num_samples=20, img_size=48, seed=7, split='val'), 5)
    assert not np.array_equal(a.image, other.image)


def test_annotations_are_consistent():
    config = ShapesConfig(num_samples=30, img_size=64, min_objects=2, max_objects=4, seed=1)
    for index in range(30):
        s = render_sample(config, index)
        assert s.image.shape == (64, 64, 3) and s.image.dtype == np.uint8
        assert len(s.labels) == len(s.boxes) == len(s.masks) >= 1
        covered = np.zeros((64, 64), dtype=int)
        for label, box, mask in zip(s.labels, s.boxes, s.masks):
            rows, cols = np.nonzero(mask)
            assert box.tolist() == [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]
            assert (s.semantic[mask] == label + 1).all()
            covered += mask
        assert covered.max() <= 1, 'visible instance masks must not overlap'
        assert ((s.semantic > 0) == (covered > 0)).all()


def test_classification_view():
    data = ShapesClassification(num_samples=12, img_size=32, num_classes=4)
    labels = [data[i][1] for i in range(12)]
    assert set(labels) <= set(range(4)) and data.classes == list(SHAPE_CLASSES[:4])
    assert data[0][0].size == (32, 32)
    with pytest.raises(ValueError, match='1 to 10 classes'):
        ShapesClassification(num_classes=11)


def _decode_rle(rle):
    flat = np.zeros(rle['size'][0] * rle['size'][1], dtype=bool)
    pos, value = 0, False
    for count in rle['counts']:
        flat[pos:pos + count] = value
        pos, value = pos + count, not value
    return flat.reshape(rle['size'], order='F')


def test_coco_export(tmp_path):
    config = ShapesConfig(num_samples=4, img_size=40, min_objects=1, max_objects=3, seed=3)
    data = json.loads(export_coco(config, str(tmp_path)).read_text())
    assert len(data['images']) == 4 and [c['name'] for c in data['categories']] == list(SHAPE_CLASSES)
    first = render_sample(config, 0)
    annotations = [a for a in data['annotations'] if a['image_id'] == 0]
    for ann, label, mask in zip(annotations, first.labels, first.masks):
        assert ann['category_id'] == label + 1
        assert np.array_equal(_decode_rle(ann['segmentation']), mask)
        assert ann['area'] == mask.sum()
    assert Image.open(tmp_path / 'images' / data['images'][0]['file_name']).size == (40, 40)


def test_segmentation_export(tmp_path):
    config = ShapesConfig(num_samples=3, img_size=32, min_objects=2, max_objects=2, split='val')
    export_segmentation(config, str(tmp_path))
    mask = np.asarray(Image.open(tmp_path / 'masks' / 'val_000001.png'))
    assert np.array_equal(mask, render_sample(config, 1).semantic)


def test_image_folder_skips_and_counts_unreadable_images(tmp_path):
    for cls in ('cat', 'dog'):
        (tmp_path / cls).mkdir()
        Image.new('RGB', (8, 8), 'red').save(tmp_path / cls / 'ok.png')
    (tmp_path / 'dog' / 'broken.png').write_bytes(b'not an image')
    data = SafeImageFolder(str(tmp_path))
    items = [data[i] for i in range(len(data))]
    assert sum(item is UNREADABLE for item in items) == 1
    import torchvision.transforms as T
    data.transform = T.ToTensor()
    images, labels, skipped = skip_unreadable_collate([data[i] for i in range(len(data))])
    assert images.shape == (2, 3, 8, 8) and skipped == 1


def test_missing_or_empty_image_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match='dataset folder not found'):
        SafeImageFolder(str(tmp_path / 'nowhere'))
    (tmp_path / 'empty_class').mkdir()
    with pytest.raises(FileNotFoundError, match='no images in'):
        SafeImageFolder(str(tmp_path))
