"""Image and audio documents as raw bytes, laid out as MEGABYTE reads them."""

from __future__ import annotations

import io
import math
import wave
from typing import BinaryIO

import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".npy")
AUDIO_SUFFIXES = (".wav",)


def patch_side(patch_size: int) -> int:
    """Side p of the p x p x 3 pixel block that fills one patch of `patch_size` bytes."""
    side = math.isqrt(patch_size // 3)
    if side < 1 or side * side * 3 != patch_size:
        raise ValueError(f"patch size {patch_size} is not 3 * p * p for an integer p (e.g. 12, 48, 192)")
    return side


def patch_scan(pixels: np.ndarray, patch_size: int) -> bytes:
    """RGB pixels [H, W, 3] in patch-scan order: p x p x 3 blocks, left to right then top
    to bottom, each block row-major with interleaved channels (MEGABYTE, section 5.1)."""
    side = patch_side(patch_size)
    height, width, _ = pixels.shape
    if height % side or width % side:
        raise ValueError(f"image {height}x{width} is not a multiple of the {side}-pixel patch side")
    blocks = pixels.reshape(height // side, side, width // side, side, 3).transpose(0, 2, 1, 3, 4)
    return np.ascontiguousarray(blocks, np.uint8).tobytes()


def image_bytes(data: bytes, suffix: str, image_size: int, patch_size: int) -> bytes:
    """An encoded image (PNG/JPEG via Pillow, or a uint8 .npy array [H, W] / [H, W, 3|4])
    resized to image_size x image_size RGB (box filter) in patch-scan order."""
    if suffix == ".npy":
        pixels = _rgb_array(np.load(io.BytesIO(data), allow_pickle=False))
        if pixels.shape[:2] != (image_size, image_size):
            pixels = _resized(_pil_image().fromarray(pixels), image_size)
    else:
        pixels = _resized(_pil_image().open(io.BytesIO(data)).convert("RGB"), image_size)
    return patch_scan(pixels, patch_size)


def _rgb_array(array: np.ndarray) -> np.ndarray:
    if array.dtype != np.uint8:
        raise ValueError(f".npy image has dtype {array.dtype}, expected uint8")
    if array.ndim == 2:
        return np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim == 3 and array.shape[2] in (3, 4):
        return np.ascontiguousarray(array[:, :, :3])
    raise ValueError(f".npy image has shape {array.shape}, expected [H, W], [H, W, 3] or [H, W, 4]")


def _pil_image():  # noqa: ANN202 - returns the PIL.Image module
    try:
        from PIL import Image
    except ImportError as e:
        raise ImportError("--modality image needs Pillow: pip install 'megatrain[image]'") from e
    return Image


def _resized(image: "PIL.Image.Image", size: int) -> np.ndarray:  # noqa: F821
    if image.size != (size, size):
        image = image.resize((size, size), _pil_image().Resampling.BOX)
    return np.asarray(image, np.uint8)


def wav_bytes(stream: BinaryIO) -> bytes:
    """The PCM sample bytes of a .wav file (header dropped, frames as stored)."""
    with wave.open(stream, "rb") as audio:
        return audio.readframes(audio.getnframes())
