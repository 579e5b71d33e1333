"""safe_join keeps dataset paths inside their root; load_rgb decodes fully or names the file."""

import pytest
from PIL import Image

from mmke.data import load_rgb, safe_join


def test_safe_join_accepts_nested_relative_paths(tmp_path):
    assert safe_join(tmp_path, "a/b/c.png") == tmp_path.resolve() / "a" / "b" / "c.png"
    # '..' that stays inside the root is harmless
    assert safe_join(tmp_path, "a/../b/c.png") == tmp_path.resolve() / "b" / "c.png"


def test_safe_join_follows_symlinks_that_stay_inside(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    assert safe_join(tmp_path, "link/x.png") == tmp_path.resolve() / "real" / "x.png"


@pytest.mark.parametrize("rel", ["../secret.png", "a/../../secret.png"])
def test_safe_join_refuses_dotdot_escape(tmp_path, rel):
    root = tmp_path / "root"
    root.mkdir()
    with pytest.raises(ValueError, match="escapes image root") as err:
        safe_join(root, rel)
    assert rel in str(err.value) and str(root.resolve()) in str(err.value)


def test_safe_join_refuses_absolute_path(tmp_path):
    target = str(tmp_path / "root" / "x.png")  # absolute even though it points inside the root
    with pytest.raises(ValueError, match="escapes image root") as err:
        safe_join(tmp_path / "root", target)
    assert target in str(err.value)


def test_safe_join_refuses_symlink_pointing_outside(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "link").symlink_to(outside)
    with pytest.raises(ValueError, match="escapes image root") as err:
        safe_join(root, "link/x.png")
    assert "link/x.png" in str(err.value)


def test_safe_join_refuses_empty_path(tmp_path):
    with pytest.raises(ValueError, match="empty image path"):
        safe_join(tmp_path, "")


@pytest.mark.parametrize(
    ("mode", "colour", "expected"),
    [("L", 200, (200, 200, 200)), ("RGBA", (10, 20, 30, 128), (10, 20, 30))],
)
def test_load_rgb_converts_to_rgb(tmp_path, mode, colour, expected):
    path = tmp_path / f"{mode}.png"
    Image.new(mode, (5, 3), colour).save(path)
    image = load_rgb(path)
    assert image.mode == "RGB"
    assert image.size == (5, 3)
    assert image.getpixel((4, 2)) == expected


def test_load_rgb_raises_on_garbage_bytes(tmp_path):
    path = tmp_path / "garbage.png"
    path.write_bytes(b"this is not an image")
    with pytest.raises(ValueError, match="cannot read image") as err:
        load_rgb(path)
    assert str(path) in str(err.value)


def test_load_rgb_raises_on_truncated_pixel_data(tmp_path):
    # A valid header with missing pixel data opens fine; only a full decode notices.
    path = tmp_path / "truncated.png"
    Image.effect_noise((64, 64), 50).save(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError) as err:
        load_rgb(path)
    assert str(path) in str(err.value)


def test_load_rgb_raises_on_missing_file(tmp_path):
    path = tmp_path / "missing.png"
    with pytest.raises(ValueError) as err:
        load_rgb(path)
    assert str(path) in str(err.value)
