"""PASCAL VOC: annotation parsing, bad input, the C4 detector's shapes, and a smoke fine-tune
on a one-class VOC folder (synthetic squares, and the real voc_raccoon set)."""

import numpy as np
import pytest
import torch
from PIL import Image

from mtssl.config import load_config
from mtssl.eval.common import EvalError, random_trunk, suite_settings
from mtssl.eval.pascal import AnnotationError, C4BoxHead, build_detector, load_split, parse_voc_xml, run

XML = """<annotation><filename>{name}</filename>
<size><width>100</width><height>80</height><depth>3</depth></size>{objects}</annotation>"""
OBJ = ("<object><name>{cls}</name>{flags}<bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin>"
       "<xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>")


def obj(cls="cat", flags="", box=(11, 21, 50, 60)):
    return OBJ.format(cls=cls, flags=flags, x0=box[0], y0=box[1], x1=box[2], y1=box[3])


def test_parser_reads_flags_and_converts_boxes():
    text = XML.format(name="a.jpg", objects=obj(flags="<difficult>1</difficult>"
                                                     "<truncated>0</truncated>")
                      + obj("dog", "<truncated>1</truncated>", (1, 1, 100, 90)))
    ann = parse_voc_xml(text)
    assert (ann.filename, ann.width, ann.height) == ("a.jpg", 100, 80)
    cat, dog = ann.objects
    assert cat.difficult and not cat.truncated and cat.box == (10.0, 20.0, 50.0, 60.0)
    # missing <difficult> means not difficult; boxes are clipped to the image (height 80)
    assert not dog.difficult and dog.truncated and dog.box == (0.0, 0.0, 100.0, 80.0)


@pytest.mark.parametrize("text, message", [
    (XML.format(name="a.jpg", objects=obj().replace("<xmax>50</xmax>", "")),
     "object 1: missing <bndbox/xmax>"),
    (XML.format(name="a.jpg", objects=obj().replace("<name>cat</name>", "")),
     "object 1: missing <name>"),
    (XML.format(name="", objects=obj()), "missing <filename>"),
    (XML.format(name="a.jpg", objects=obj(flags="<difficult>yes</difficult>")),
     "<difficult> must be 0 or 1"),
    (XML.format(name="a.jpg", objects=obj(box=(11, 21, "ten", 60))), "is not a number: 'ten'"),
    (XML.format(name="a.jpg", objects=obj(box=(50, 21, 40, 60))), "empty box"),
    ("<annotation><filename>a.jpg</filename>", "not valid XML"),
    ("<notes/>", "expected <annotation>"),
])
def test_parser_errors_name_the_field(text, message):
    with pytest.raises(AnnotationError, match=message.replace("(", "\\(")):
        parse_voc_xml(text, name="x.xml")


def write_voc(root, items):
    """A tiny VOC layout: items of (id, image exists?, annotation text or None)."""
    for d in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (root / d).mkdir(parents=True, exist_ok=True)
    for image_id, has_image, text in items:
        if has_image:
            Image.fromarray(np.full((80, 100, 3), 128, np.uint8)).save(
                root / "JPEGImages" / f"{image_id}.jpg")
        if text is not None:
            (root / "Annotations" / f"{image_id}.xml").write_text(text)
    (root / "ImageSets/Main/train.txt").write_text("".join(f"{i}\n" for i, _, _ in items))


def test_bad_samples_are_skipped_and_counted(tmp_path):
    write_voc(tmp_path, [("ok", True, XML.format(name="ok.jpg", objects=obj())),
                         ("noimg", False, XML.format(name="noimg.jpg", objects=obj())),
                         ("noxml", True, None),
                         ("broken", True, "<annotation>")])
    samples, problems = load_split(tmp_path, "train", None)
    assert [s[0] for s in samples] == ["ok"]
    assert sorted(r for _, r in problems) == ["bad_annotation", "missing_annotation",
                                              "missing_image"]
    with pytest.raises(EvalError, match="splits present: \\['train'\\]"):
        load_split(tmp_path, "trainval", None)


def test_c4_detector_shapes():
    loaded = random_trunk(load_config("quickstart", ["trunk.width=0.0625"]).trunk)
    head = C4BoxHead(in_ch=64, width=0.0625, units=2, norm="batch")
    assert head(torch.randn(5, 64, 14, 14)).shape == (5, 128)  # block 4: 2048 * width
    s = suite_settings("pascal", "smoke")
    model = build_detector(loaded, num_classes=3, s=s).eval()
    feats = model.backbone(torch.zeros(1, 3, 128, 160))["0"]
    assert feats.shape == (1, 64, 8, 10)  # stride 16 through block 3
    assert model.roi_heads.box_predictor.cls_score.out_features == 4  # 3 classes + background
    with torch.no_grad():
        out = model([torch.rand(3, 100, 120)])[0]
    assert out["boxes"].shape[1] == 4 and len(out["scores"]) == len(out["labels"])


def test_smoke_fine_tune_on_one_class(voc):
    loaded = random_trunk(load_config("quickstart", ["trunk.width=0.0625",
                                                     "trunk.units=[1,1,2]"]).trunk)
    s = suite_settings("pascal", "smoke", ["iterations=4", "max_train_images=16",
                                           "max_test_images=6", "min_size=96", "max_size=128"])
    r = run(loaded, voc.root, s, settings_name="smoke")
    assert r["classes"] == [voc.cls] and set(r["per_class_ap"]) == {voc.cls}
    assert 0.0 <= r["metrics"]["mAP"] <= 1.0 and r["metrics"]["mAP"] == r["per_class_ap"][voc.cls]
    assert (r["train_images"], r["test_images"], r["skipped"]) == (16, 6, {})
    assert np.isfinite(r["loss_first"]) and np.isfinite(r["loss_last"])
