"""Dataset readers: the layouts they accept, and malformed inputs rejected with the file named."""

import json

import numpy as np
import pytest
from PIL import Image

from vsink.data.synthetic import synthetic_dataset, write_voc
from vsink.evaluate.datasets import DatasetError, read_ade, read_coco, read_folder, read_voc, read_mask
from vsink.evaluate.open import open_dataset


@pytest.fixture
def voc(tmp_path):
    data = synthetic_dataset("val", num_images=3, size=64)
    write_voc(data, tmp_path / "VOC")
    return data, tmp_path / "VOC"


def test_synthetic_is_seeded_and_consistent():
    a, b = synthetic_dataset("val", num_images=4, size=64), synthetic_dataset("val", num_images=4, size=64)
    c = synthetic_dataset("train", num_images=4, size=64)
    for sa, sb, sc in zip(a.samples, b.samples, c.samples):
        la, lb = sa.load(), sb.load()
        assert np.array_equal(np.asarray(la.image), np.asarray(lb.image))
        assert not np.array_equal(np.asarray(la.image), np.asarray(sc.load().image))
        for (x0, y0, x1, y1) in la.boxes:  # every box encloses labelled object pixels up to its edges
            inside = la.mask[int(y0):int(y1), int(x0):int(x1)]
            assert ((inside > 0) & (inside < 255)).any()
        assert set(np.unique(la.mask)) <= {0, 1, 2, 3, 255}


def test_voc_round_trip(voc):
    data, root = voc
    read = read_voc(root, "val")
    assert read.info["image_set"] == "segmentation" and len(read) == 3
    for orig, got in zip(data.samples, read.samples):
        a, b = orig.load(), got.load()
        assert np.array_equal(a.mask, b.mask)
        np.testing.assert_array_equal(a.boxes, b.boxes)  # 1-based inclusive XML back to exclusive ends
        assert b.image.size == a.image.size


def test_datasets_and_samples_print_briefly(voc):
    data, root = voc
    assert repr(read_voc(root, "val")) == "DenseDataset('VOC', format='voc', split='val', 3 items)"
    assert repr(data) == "DenseDataset('synthetic', format='synthetic', split='val', 3 items)"
    assert repr(data[0]) == (f"DenseSample('val_0000', image=<image 64x64>, mask=array[64, 64], "
                             f"boxes=array{list(data[0].boxes.shape)})")
    image, mask = root / "JPEGImages" / "val_0000.jpg", root / "SegmentationClass" / "val_0000.png"
    assert repr(read_voc(root, "val")[0]) == f"DenseSample('val_0000', image='{image}', mask='{mask}', boxes=<read on load>)"


def test_voc_errors_name_the_file(voc):
    _, root = voc
    with pytest.raises(DatasetError, match=r"Segmentation/test\.txt and .*Main/test\.txt: split list not found; available: val"):
        read_voc(root, "test")
    xml = root / "Annotations" / "val_0001.xml"
    xml.write_text("<annotation><object><bndbox><xmin>3</xmin></bndbox></object></annotation>")
    sample = read_voc(root, "val")[1]
    with pytest.raises(DatasetError, match=r"val_0001\.xml: object without a finite numeric bndbox"):
        sample.load()
    xml.write_text("<annotation")
    with pytest.raises(DatasetError, match=r"val_0001\.xml:1: not valid XML"):
        read_voc(root, "val")[1].load()
    Image.new("RGB", (64, 64)).save(root / "SegmentationClass" / "val_0002.png")
    with pytest.raises(DatasetError, match=r"val_0002\.png: mask must be a palette or greyscale PNG"):
        read_voc(root, "val")[2].load()
    Image.new("L", (32, 64)).save(root / "SegmentationClass" / "val_0002.png")
    with pytest.raises(DatasetError, match=r"val_0002\.png: mask is 32x64 but the image is 64x64"):
        read_voc(root, "val")[2].load()
    (root / "JPEGImages" / "val_0000.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DatasetError, match=r"val_0000\.jpg: not an image file"):
        read_voc(root, "val")[0].load()
    with pytest.raises(DatasetError, match=r"nowhere: VOC root directory not found"):
        read_voc(root.parent / "nowhere")


def test_ade_reduce_zero_label(tmp_path):
    (tmp_path / "images" / "validation").mkdir(parents=True)
    (tmp_path / "annotations" / "validation").mkdir(parents=True)
    Image.new("RGB", (3, 1)).save(tmp_path / "images" / "validation" / "a.jpg")
    Image.fromarray(np.array([[0, 1, 150]], dtype=np.uint8), mode="L").save(
        tmp_path / "annotations" / "validation" / "a.png")
    data = read_ade(tmp_path)
    assert data.num_classes == 150
    assert data[0].load().mask.tolist() == [[255, 0, 149]]
    assert read_mask(tmp_path / "annotations" / "validation" / "a.png").tolist() == [[0, 1, 150]]
    Image.new("RGB", (3, 1)).save(tmp_path / "images" / "validation" / "b.jpg")
    with pytest.raises(DatasetError, match=r"b\.png: annotation missing for b\.jpg"):
        read_ade(tmp_path)


def test_folder_with_and_without_splits(tmp_path):
    for sub in ("images/train", "masks/train", "images/val", "masks/val"):
        (tmp_path / sub).mkdir(parents=True)
    for split in ("train", "val"):
        Image.new("RGB", (4, 4)).save(tmp_path / "images" / split / "x.png")
        Image.new("L", (4, 4), 2).save(tmp_path / "masks" / split / "x.png")
    assert open_dataset("folder", tmp_path, "train")[0].load().mask.max() == 2
    flat = tmp_path / "flat"
    (flat / "images").mkdir(parents=True)
    (flat / "masks").mkdir()
    Image.new("RGB", (4, 4)).save(flat / "images" / "y.jpg")
    Image.new("L", (4, 4)).save(flat / "masks" / "y.png")
    assert read_folder(flat).info["flat"]
    Image.new("RGB", (4, 4)).save(flat / "images" / "z.jpg")
    with pytest.raises(DatasetError, match=r"z\.png: mask missing for z\.jpg"):
        read_folder(flat)


def test_coco_boxes_and_errors(tmp_path):
    images = tmp_path / "val2017"
    images.mkdir()
    Image.new("RGB", (10, 10)).save(images / "1.jpg")
    ann = {"images": [{"id": 1, "file_name": "1.jpg"}, {"id": 2, "file_name": "2.jpg"}],
           "annotations": [{"image_id": 1, "bbox": [1, 2, 3, 4], "category_id": 5},
                           {"image_id": 1, "bbox": [0, 0, 9, 9], "category_id": 5, "iscrowd": 1}],
           "categories": [{"id": 5, "name": "cat"}]}
    (tmp_path / "annotations").mkdir()
    path = tmp_path / "annotations" / "instances_val2017.json"
    path.write_text(json.dumps(ann))
    data = read_coco(path)  # images found next to the JSON by the split name
    assert len(data) == 1 and data.class_names == ["cat"]  # image 2 has no box; the crowd box is skipped
    np.testing.assert_array_equal(data[0].load().boxes, [[1, 2, 4, 6]])
    assert len(read_coco(path, include_crowd=True)[0].load().boxes) == 2
    path.write_text("{")
    with pytest.raises(DatasetError, match=r"instances_val2017\.json:1: not valid JSON"):
        read_coco(path)
    path.write_text(json.dumps({"images": [{"id": 1}]}))
    with pytest.raises(DatasetError, match=r"instances_val2017\.json: images\[0\]: missing field 'file_name'"):
        read_coco(path)
    ann["annotations"][0]["image_id"] = 7
    path.write_text(json.dumps(ann))
    with pytest.raises(DatasetError, match=r"instances_val2017\.json: annotations\[0\] refers to unknown image_id 7"):
        read_coco(path)
    with pytest.raises(DatasetError, match="unknown dataset format 'kitti'"):
        open_dataset("kitti", tmp_path)
    with pytest.raises(DatasetError, match="needs a data path"):
        open_dataset("voc")
