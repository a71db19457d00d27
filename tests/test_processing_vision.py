"""Image/video preprocessing against transformers' PIL image processor and a loop-by-loop hand patchify."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from pixel_reasoner_jax.processing import vision as pv

MEAN = np.array(pv.IMAGE_MEAN)
STD = np.array(pv.IMAGE_STD)
TINY_MAX = 448 * 448


def _image(w: int, h: int, seed: int = 0) -> Image.Image:
    """Noise plus a gradient: the noise exercises every pixel, the gradient gives resampling something smooth."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    grad = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), (xx + yy) % 256], -1)
    arr = (grad * 0.6 + rng.integers(0, 256, (h, w, 3)) * 0.4).astype(np.uint8)
    return Image.fromarray(arr)


@pytest.fixture(scope="module")
def hf_processors(tmp_path_factory):
    """transformers' image processors (PIL backend: no torchvision here) loaded from our written files."""
    from transformers import AutoImageProcessor

    out = {}
    for name, max_pixels in (("tiny", TINY_MAX), ("hub", pv.HUB_MAX_PIXELS)):
        folder = tmp_path_factory.mktemp(name)
        pv.write_processor_files(folder, min_pixels=pv.HUB_MIN_PIXELS, max_pixels=max_pixels)
        out[name] = (
            AutoImageProcessor.from_pretrained(str(folder)),
            pv.ImageProcessorConfig.from_pretrained(folder),
        )
    return out


# (width, height, limits): upsampled to min_pixels, downsampled to max_pixels, extreme aspect ratios
# (100 and 200, the limit), sizes that round down (70/28 = 2.5 -> 2) and sizes already on the grid.
SIZES = [
    (56, 84, "tiny"),
    (29, 29, "tiny"),
    (28, 28, "tiny"),
    (30, 3000, "tiny"),
    (3000, 30, "tiny"),
    (28, 5600, "tiny"),
    (70, 98, "tiny"),
    (640, 480, "tiny"),
    (1000, 1000, "tiny"),
    (123, 457, "tiny"),
    (1500, 900, "hub"),
]


@pytest.mark.parametrize("w,h,which", SIZES)
def test_image_matches_transformers(hf_processors, w, h, which):
    hf, cfg = hf_processors[which]
    img = _image(w, h, seed=w + h)
    pixel_values, grid = pv.preprocess_image(img, cfg)
    ref = hf(images=[img], return_tensors="np")
    np.testing.assert_array_equal(grid, ref["image_grid_thw"][0])
    assert pixel_values.dtype == np.float32 and pixel_values.shape == ref["pixel_values"].shape
    np.testing.assert_allclose(pixel_values, ref["pixel_values"], atol=1e-5, rtol=0)
    assert grid[1] * grid[2] * 14 * 14 <= cfg.max_pixels and grid[1] * grid[2] * 14 * 14 >= cfg.min_pixels
    assert pv.num_image_tokens(grid) == grid[1] * grid[2] // 4


def test_ratio_over_200_is_refused():
    with pytest.raises(ValueError, match="aspect ratio"):
        pv.preprocess_image(_image(28, 5629), pv.ImageProcessorConfig())


def _hand_rows(frames: np.ndarray, p: int = 14, m: int = 2, tp: int = 2) -> np.ndarray:
    """pixel_values built one row at a time from reference/qwen25vl.md §5.3, for (T, C, H, W) frames."""
    t, c, h, w = frames.shape
    gh, gw = h // p, w // p
    rows = []
    for gt in range(t // tp):
        for bh in range(gh // m):
            for bw in range(gw // m):
                for ih in range(m):
                    for iw in range(m):
                        y, x = (bh * m + ih) * p, (bw * m + iw) * p
                        patch = frames[gt * tp : (gt + 1) * tp, :, y : y + p, x : x + p]  # (tp, C, p, p)
                        rows.append(patch.transpose(1, 0, 2, 3).reshape(-1))  # columns: c, t, py, px
    return np.stack(rows)


def _hand_normalize(img: Image.Image) -> np.ndarray:
    return ((np.asarray(img, dtype=np.float64) / 255.0 - MEAN) / STD).transpose(2, 0, 1)


def test_video_against_hand_patchify():
    cfg = pv.ImageProcessorConfig(max_pixels=TINY_MAX)
    frames = [_image(100, 60, seed=s) for s in range(5)]  # odd count: the last frame is repeated
    pixel_values, grid, spg = pv.preprocess_video(frames, cfg, fps=2.0)
    h, w = pv.smart_resize(60, 100, min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
    resized = [f.resize((w, h), Image.BICUBIC) for f in frames]
    stack = np.stack([_hand_normalize(f) for f in [*resized, resized[-1]]])
    expected = _hand_rows(stack)
    np.testing.assert_array_equal(grid, [3, h // 14, w // 14])
    assert pixel_values.shape == expected.shape == (3 * (h // 14) * (w // 14), 1176)
    np.testing.assert_allclose(pixel_values, expected, atol=1e-5, rtol=0)
    assert spg == 2 / 2.0
    # Last temporal patch: frame 4 twice, so its two temporal halves are equal.
    last = pixel_values[-1].reshape(3, 2, 14, 14)
    np.testing.assert_array_equal(last[:, 0], last[:, 1])


def test_video_from_uint8_array_and_fps():
    cfg = pv.ImageProcessorConfig(max_pixels=TINY_MAX)
    arr = np.stack([np.asarray(_image(56, 84, seed=s)) for s in range(4)])
    pixel_values, grid, spg = pv.preprocess_video(arr, cfg, fps=1.0)
    np.testing.assert_array_equal(grid, [2, 6, 4])
    assert pixel_values.shape == (48, 1176) and spg == 2.0
    expected = _hand_rows(np.stack([_hand_normalize(Image.fromarray(a)) for a in arr]))
    np.testing.assert_allclose(pixel_values, expected, atol=1e-5, rtol=0)


def test_two_equal_frames_equal_one_image():
    cfg = pv.ImageProcessorConfig(max_pixels=TINY_MAX)
    img = _image(300, 200, seed=3)
    image_values, image_grid = pv.preprocess_image(img, cfg)
    video_values, video_grid, _ = pv.preprocess_video([img, img], cfg, fps=2.0)
    np.testing.assert_array_equal(image_grid, video_grid)
    np.testing.assert_array_equal(image_values, video_values)


def test_image_rows_against_hand_patchify():
    cfg = pv.ImageProcessorConfig(max_pixels=TINY_MAX)
    img = _image(84, 112, seed=9)  # already on the grid: no resize
    pixel_values, grid = pv.preprocess_image(img, cfg)
    frame = _hand_normalize(img)
    np.testing.assert_allclose(pixel_values, _hand_rows(np.stack([frame, frame])), atol=1e-5, rtol=0)
    np.testing.assert_array_equal(grid, [1, 8, 6])


def test_video_errors():
    cfg = pv.ImageProcessorConfig()
    with pytest.raises(ValueError, match="fps must be a positive number, got 0"):
        pv.preprocess_video([_image(56, 56)] * 2, cfg, fps=0)
    with pytest.raises(ValueError, match="at least one frame"):
        pv.preprocess_video([], cfg, fps=2.0)
    with pytest.raises(ValueError, match="video frame 1 is 60x56; frame 0 is 56x56"):
        pv.preprocess_video([_image(56, 56), _image(60, 56)], cfg, fps=2.0)
    with pytest.raises(ValueError, match=r"uint8 \(T, H, W, 3\)"):
        pv.preprocess_video(np.zeros((2, 56, 56), np.uint8), cfg, fps=2.0)


def _png(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def test_load_image(tmp_path):
    img = _image(40, 30)
    out = pv.load_image(_png(img))
    assert out.mode == "RGB" and out.size == (40, 30)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(img))
    path = tmp_path / "a.png"
    path.write_bytes(_png(img))
    np.testing.assert_array_equal(np.asarray(pv.load_image(path)), np.asarray(img))
    np.testing.assert_array_equal(np.asarray(pv.load_image(str(path))), np.asarray(img))
    # Transparency is composited on white.
    rgba = Image.new("RGBA", (32, 32), (10, 20, 30, 0))
    assert pv.load_image(_png(rgba)).getpixel((0, 0)) == (255, 255, 255)


def test_load_image_errors(tmp_path):
    with pytest.raises(pv.BadImageError, match=r"cannot decode image <12 bytes of image data>"):
        pv.load_image(b"not an image")
    truncated = _png(_image(64, 64))[:200]
    with pytest.raises(pv.BadImageError, match=r"cannot decode image <200 bytes"):
        pv.load_image(truncated)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(pv.BadImageError, match="bad.jpg"):
        pv.load_image(bad)
    with pytest.raises(pv.BadImageError, match=r"is 27x100; each side must be at least 28 px"):
        pv.load_image(_png(_image(27, 100)))
    with pytest.raises(pv.BadImageError, match=r"is 100x20"):
        pv.load_image(_image(100, 20))
    with pytest.raises(FileNotFoundError, match="no image file"):
        pv.load_image(tmp_path / "missing.png")
    with pytest.raises(TypeError, match="got int"):
        pv.load_image(3)


def test_processor_files_and_config_reading(tmp_path):
    path = pv.write_processor_files(tmp_path, min_pixels=3136, max_pixels=TINY_MAX)
    d = json.loads(path.read_text())
    assert d == {
        "min_pixels": 3136,
        "max_pixels": TINY_MAX,
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "image_mean": list(pv.IMAGE_MEAN),
        "image_std": list(pv.IMAGE_STD),
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2_5_VLProcessor",
    }
    assert pv.ImageProcessorConfig.from_pretrained(tmp_path) == pv.ImageProcessorConfig(max_pixels=TINY_MAX)
    # transformers 5 writes the bounds as size.{shortest,longest}_edge.
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    v5 = tmp_path / "v5"
    Qwen2VLImageProcessorPil(min_pixels=4 * 784, max_pixels=1000 * 784).save_pretrained(str(v5))
    cfg = pv.ImageProcessorConfig.from_pretrained(v5)
    assert (cfg.min_pixels, cfg.max_pixels, cfg.factor, cfg.patch_dim) == (4 * 784, 1000 * 784, 28, 1176)


def test_config_errors(tmp_path):
    with pytest.raises(ValueError, match="must give min_pixels/max_pixels or size.shortest_edge"):
        pv.ImageProcessorConfig.from_dict({"patch_size": 14})
    with pytest.raises(ValueError, match="sets do_normalize=False"):
        pv.ImageProcessorConfig.from_dict({"min_pixels": 1, "max_pixels": 2, "do_normalize": False})
    with pytest.raises(ValueError, match="need 0 < min_pixels <= max_pixels"):
        pv.ImageProcessorConfig(min_pixels=10, max_pixels=5)
    with pytest.raises(FileNotFoundError, match="no preprocessor_config.json"):
        pv.ImageProcessorConfig.from_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text("{oops")
    with pytest.raises(ValueError, match="is not valid JSON"):
        pv.ImageProcessorConfig.from_pretrained(tmp_path)


def test_num_image_tokens():
    assert pv.num_image_tokens((1, 4, 6)) == 6
    assert pv.num_image_tokens(np.array([2, 4, 6])) == 12
    with pytest.raises(ValueError, match=r"grid_thw must be 3 positive ints .* got \[1, 3, 6\]"):
        pv.num_image_tokens((1, 3, 6))
