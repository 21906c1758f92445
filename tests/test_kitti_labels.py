"""Label map: data/semantic-kitti.yaml against the official definitions, raw -> train ids."""
import numpy as np
import pytest
import yaml

from pcseg_kd.data.kitti import DEFAULT_LABEL_MAP_FILE, KittiDataError, LabelMap, read_label, read_scan
from pcseg_kd.data.kitti.testing import FIXTURE_SEQ

OFFICIAL_CLASSES = ["car", "bicycle", "motorcycle", "truck", "other-vehicle", "person", "bicyclist",
                    "motorcyclist", "road", "parking", "sidewalk", "other-ground", "building", "fence",
                    "vegetation", "trunk", "terrain", "pole", "traffic-sign"]
# independent of the yaml: raw id -> class name it must train as (None = ignored)
EXPECTED = {0: None, 1: None, 10: "car", 11: "bicycle", 13: "other-vehicle", 15: "motorcycle",
            16: "other-vehicle", 18: "truck", 20: "other-vehicle", 30: "person", 31: "bicyclist",
            32: "motorcyclist", 40: "road", 44: "parking", 48: "sidewalk", 49: "other-ground",
            50: "building", 51: "fence", 52: None, 60: "road", 70: "vegetation", 71: "trunk",
            72: "terrain", 80: "pole", 81: "traffic-sign", 99: None, 252: "car", 253: "bicyclist",
            254: "person", 255: "motorcyclist", 256: "other-vehicle", 257: "other-vehicle",
            258: "truck", 259: "other-vehicle"}


def expected_train(raw, ignore=255):
    name = EXPECTED[int(raw)]
    return ignore if name is None else OFFICIAL_CLASSES.index(name)


def test_yaml_has_official_sections_and_classes():
    cfg = yaml.safe_load(open(DEFAULT_LABEL_MAP_FILE))
    for key in ("labels", "color_map", "learning_map", "learning_map_inv", "learning_ignore"):
        assert key in cfg
    assert sorted(cfg["labels"]) == sorted(EXPECTED) == sorted(cfg["learning_map"]) == sorted(cfg["color_map"])
    assert cfg["learning_ignore"][0] is True and sum(bool(v) for v in cfg["learning_ignore"].values()) == 1
    lm = LabelMap()
    assert lm.class_names == OFFICIAL_CLASSES and lm.num_classes == 19
    assert cfg["color_map"][10] == [245, 150, 100]  # BGR, as in the official file


def test_every_raw_id_maps_like_the_official_table():
    lm = LabelMap(ignore_index=255)
    raw = np.array(sorted(EXPECTED), dtype=np.uint32)
    np.testing.assert_array_equal(lm.to_train(raw), [expected_train(r) for r in raw])
    # moving classes train as their static class
    assert lm.to_train(np.array([252]))[0] == lm.to_train(np.array([10]))[0]


def test_ignore_index_is_explicit_and_checked():
    assert LabelMap(ignore_index=-100).to_train(np.array([0, 1, 52, 99])).tolist() == [-100] * 4
    with pytest.raises(ValueError, match="collides"):
        LabelMap(ignore_index=3)


def test_to_raw_round_trip():
    lm = LabelMap()
    raw = lm.to_raw(np.arange(19))
    np.testing.assert_array_equal(lm.to_train(raw), np.arange(19))
    assert raw.dtype == np.uint32 and raw[0] == 10 and raw[-1] == 81


def test_unknown_ids_error_names_source_or_ignore():
    lm = LabelMap()
    with pytest.raises(KittiDataError, match=r"foo\.label: unknown raw label ids: 7 \(x2\), 300"):
        lm.to_train(np.array([40, 7, 7, 300]), source="foo.label")
    assert lm.to_train(np.array([40, 7]), unknown="ignore").tolist() == [8, 255]


@pytest.mark.skipif(not FIXTURE_SEQ.is_dir(), reason=f"real SemanticKITTI fixture not found at {FIXTURE_SEQ}")
def test_real_scan_every_raw_id_present():
    scan = read_scan(FIXTURE_SEQ / "velodyne" / "000000.bin")
    sem, inst = read_label(FIXTURE_SEQ / "labels" / "000000.label", len(scan))
    assert scan.shape == (123389, 4) and scan.dtype == np.float32
    present = np.unique(sem).tolist()
    assert present == [0, 1, 10, 11, 30, 40, 44, 48, 50, 51, 52, 70, 71, 72, 80, 81, 99, 252, 254]
    train = LabelMap().to_train(sem)
    for raw in present:
        assert set(train[sem == raw].tolist()) == {expected_train(raw)}, raw
    assert inst[sem == 10].max() > 0  # cars carry instance ids in the upper 16 bits
