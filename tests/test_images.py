"""Unusual but valid images become upright 8-bit RGB; bad files give clear errors."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from vsink.errors import ImageError, VsinkError
from vsink.images import expand_paths, load_image


def test_modes_convert_to_rgb(tmp_path):
    base = Image.new("RGB", (40, 30), (200, 100, 50))
    base.convert("CMYK").save(tmp_path / "cmyk.jpg")
    base.convert("L").save(tmp_path / "grey.png")
    base.convert("P", palette=Image.Palette.ADAPTIVE).save(tmp_path / "palette.png")
    rgba = base.convert("RGBA")
    rgba.putalpha(0)
    rgba.save(tmp_path / "transparent.png")
    sixteen = Image.fromarray(np.full((30, 40), 65535, dtype=np.uint16))
    sixteen.save(tmp_path / "sixteen.png")
    for name in ("cmyk.jpg", "grey.png", "palette.png", "transparent.png", "sixteen.png"):
        img = load_image(tmp_path / name)
        assert img.mode == "RGB" and img.size == (40, 30), name
    assert load_image(tmp_path / "palette.png").getpixel((0, 0)) == (200, 100, 50)
    assert load_image(tmp_path / "transparent.png").getpixel((0, 0)) == (255, 255, 255)  # on white
    assert load_image(tmp_path / "sixteen.png").getpixel((0, 0)) == (255, 255, 255)  # scaled, not clipped
    half = Image.fromarray(np.full((30, 40), 32768, dtype=np.uint16))
    half.save(tmp_path / "half.png")
    assert load_image(tmp_path / "half.png").getpixel((0, 0))[0] == 128


def test_exif_rotation_and_large_images(tmp_path):
    img = Image.new("RGB", (60, 20), (0, 0, 0))
    img.paste((255, 0, 0), (0, 0, 10, 20))  # red strip on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    img.save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    upright = load_image(tmp_path / "rotated.jpg")
    assert upright.size == (20, 60)
    r, g, b = upright.getpixel((10, 5))  # the red strip is now at the top
    assert r > 200 and g < 60
    Image.new("RGB", (6000, 4000), (10, 20, 30)).save(tmp_path / "large.png")
    assert load_image(tmp_path / "large.png").size == (6000, 4000)


def test_bad_files_name_file_and_reason(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("hello")
    good = tmp_path / "good.jpg"
    Image.new("RGB", (64, 64), (1, 2, 3)).save(good)
    (tmp_path / "truncated.jpg").write_bytes(good.read_bytes()[:200])
    with pytest.raises(ImageError, match=r"empty\.jpg: empty file"):
        load_image(tmp_path / "empty.jpg")
    with pytest.raises(ImageError, match=r"notes\.txt: not an image"):
        load_image(tmp_path / "notes.txt")
    with pytest.raises(ImageError, match=r"truncated\.jpg: corrupt or truncated"):
        load_image(tmp_path / "truncated.jpg")


def test_expand_paths(tmp_path):
    (tmp_path / "sub").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "sub" / "b.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "a.jpg")
    (tmp_path / "readme.md").write_text("x")
    assert expand_paths([tmp_path]) == [tmp_path / "a.jpg", tmp_path / "sub" / "b.png"]
    assert expand_paths([tmp_path / "readme.md"]) == [tmp_path / "readme.md"]  # given explicitly: tried
    (tmp_path / "empty").mkdir()
    with pytest.raises(VsinkError, match="contains no image files"):
        expand_paths([tmp_path / "empty"])
    with pytest.raises(VsinkError, match="no such file or directory"):
        expand_paths([tmp_path / "missing.jpg"])
