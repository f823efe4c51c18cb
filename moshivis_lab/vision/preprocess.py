"""Image preprocessing for SigLIP, as MoshiVis does it: square bicubic resize, [0, 1], mean/std 0.5.

``preprocess`` accepts what people have at hand and says what to do when it cannot use it:

- a PIL image of any mode: RGB as is; modes with alpha (RGBA, LA, PA, P with transparency,
  RGBa, La) are composited over ``background`` (white by default) rather than having their alpha
  dropped (which would reveal whatever colour transparent pixels happen to store); grey (L, 1),
  palette (P), CMYK and YCbCr are converted to RGB; 16-bit grey (I;16*) is scaled by 1/65535;
  32-bit integer grey (I) must hold 0..255 or 0..65535; float grey (F) must hold [0, 1];
- a numpy array ``HxW`` (grey), ``HxWx1``, ``HxWx3`` (RGB) or ``HxWx4`` (RGBA), ``uint8`` (0..255)
  or float in [0, 1];
- a path (``str`` / ``os.PathLike``) to an image file;
- a list (or tuple) of any of these.

Images are squared by resizing (no crop, no padding: the aspect ratio is not kept, as in the
paper). uint8 images are resized by PIL in 8 bits; float images channel by channel in 32-bit
float (PIL mode ``F``, same filter), then clipped to [0, 1] (bicubic overshoots).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from moshivis_lab.vision.config import VisionConfig

ImageLike = Union[Image.Image, np.ndarray, str, os.PathLike]  # noqa: UP007 (runtime alias)
Images = Union[ImageLike, Sequence[ImageLike]]  # noqa: UP007

WHITE = (255, 255, 255)

_RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "lanczos": Image.Resampling.LANCZOS,
    "nearest": Image.Resampling.NEAREST,
}
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_PLAIN_CONVERTIBLE = ("L", "1", "P", "CMYK", "YCbCr", "RGBX")


# ---------------------------------------------------------------------------------------------
# One image -> RGB (uint8 PIL image, or float32 HxWx3 array in [0, 1])


def _check_background(background: Sequence[int]) -> tuple[int, int, int]:
    bg = tuple(int(v) for v in background)
    if len(bg) != 3 or not all(0 <= v <= 255 for v in bg):
        raise ValueError(
            f"background must be an (R, G, B) tuple of 0..255 ints, got {background!r}"
        )
    return bg  # type: ignore[return-value]


def _composite(rgba: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    base = Image.new("RGBA", rgba.size, (*background, 255))
    return Image.alpha_composite(base, rgba).convert("RGB")


def pil_to_rgb(image: Image.Image, background: Sequence[int] = WHITE) -> Image.Image | np.ndarray:
    """Any-mode PIL image -> an RGB PIL image, or a float32 ``HxWx3`` array in [0, 1] for
    high-bit-depth modes (I;16*, I above 255, F). Alpha is composited over ``background``; an
    EXIF orientation (a phone's portrait JPEG) is applied, as photo viewers do."""
    bg = _check_background(background)
    if image.width == 0 or image.height == 0:
        raise ValueError(f"the image is empty ({image.width}x{image.height} pixels)")
    image = upright(image)
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in _ALPHA_MODES or (mode == "P" and "transparency" in image.info):
        return _composite(image.convert("RGBA"), bg)
    if mode in _PLAIN_CONVERTIBLE:
        return image.convert("RGB")
    if mode.startswith("I;16"):
        arr = np.asarray(image, dtype=np.float32) / 65535.0
        return np.repeat(arr[..., None], 3, axis=-1)
    if mode == "I":
        arr = np.asarray(image, dtype=np.int64)
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi > 65535:
            raise ValueError(
                f"a mode 'I' (32-bit integer) image must hold 0..255 or 0..65535, got {lo}..{hi}; "
                "rescale it and pass a uint8 array or a float array in [0, 1]"
            )
        scale = 255.0 if hi <= 255 else 65535.0
        return np.repeat((arr.astype(np.float32) / scale)[..., None], 3, axis=-1)
    if mode == "F":
        return _float_rgb(
            np.asarray(image, dtype=np.float32)[..., None], bg, what="a mode 'F' image"
        )
    try:
        return image.convert("RGB")
    except ValueError as e:
        raise ValueError(
            f"cannot convert a PIL image of mode {mode!r} to RGB ({e}); convert it yourself "
            "(for example image.convert('RGB')) before passing it"
        ) from e


def _float_rgb(arr: np.ndarray, bg: tuple[int, int, int], what: str) -> np.ndarray:
    """``HxWxC`` float (C in 1, 3, 4), checked to lie in [0, 1] -> float32 ``HxWx3``."""
    if not np.isfinite(arr).all():
        raise ValueError(f"{what} holds NaN or infinite values; clean it before passing it")
    lo, hi = float(arr.min()), float(arr.max())
    if lo < 0.0 or hi > 1.0:
        hint = (
            "it looks like 0..255: divide by 255 (or pass it as uint8)"
            if hi <= 255.0 and lo >= 0.0
            else "rescale it to [0, 1] (or clip it with np.clip(x, 0, 1))"
        )
        raise ValueError(f"{what} must hold values in [0, 1], got {lo:g}..{hi:g}; {hint}")
    arr = arr.astype(np.float32, copy=False)
    c = arr.shape[-1]
    if c == 1:
        return np.repeat(arr, 3, axis=-1)
    if c == 3:
        return arr
    alpha = arr[..., 3:4]
    back = np.asarray(bg, dtype=np.float32) / 255.0
    return arr[..., :3] * alpha + back * (1.0 - alpha)


def array_to_rgb(arr: np.ndarray, background: Sequence[int] = WHITE) -> Image.Image | np.ndarray:
    """A numpy image -> an RGB PIL image (uint8 input) or a float32 ``HxWx3`` array in [0, 1].

    Accepted: ``HxW``, ``HxWx1`` (grey), ``HxWx3`` (RGB), ``HxWx4`` (RGBA, alpha composited over
    ``background``); ``uint8`` (0..255) or float (16/32/64-bit) in [0, 1].
    """
    bg = _check_background(background)
    if not isinstance(arr, np.ndarray):
        raise TypeError(f"expected a numpy array, got {type(arr).__name__}")
    shape = arr.shape
    if arr.ndim == 2:
        arr = arr[..., None]
    elif arr.ndim == 3 and shape[-1] in (1, 3, 4):
        pass
    elif arr.ndim == 3 and shape[0] in (1, 3, 4):
        raise ValueError(
            f"array of shape {shape} looks channels-first (CxHxW); images must be HxW, HxWx3 or "
            "HxWx4: pass arr.transpose(1, 2, 0)"
        )
    elif arr.ndim == 4:
        raise ValueError(
            f"array of shape {shape} is a batch; pass one image per array, e.g. list(arr) "
            "(each HxW, HxWx3 or HxWx4)"
        )
    else:
        raise ValueError(
            f"array of shape {shape} is not an image; expected HxW (grey), HxWx3 (RGB) or "
            "HxWx4 (RGBA)"
        )
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"array of shape {shape} is empty; an image needs at least 1x1 pixels")
    if arr.dtype == np.uint8:
        c = arr.shape[-1]
        if c == 1:
            return Image.fromarray(np.ascontiguousarray(arr[..., 0]), "L").convert("RGB")
        if c == 3:
            return Image.fromarray(np.ascontiguousarray(arr), "RGB")
        return _composite(Image.fromarray(np.ascontiguousarray(arr), "RGBA"), bg)
    if np.issubdtype(arr.dtype, np.floating):
        return _float_rgb(arr, bg, what=f"a float array ({arr.dtype})")
    if arr.dtype == np.bool_:
        raise ValueError(
            "boolean arrays are masks, not images; pass arr.astype(np.uint8) * 255 to draw one"
        )
    if np.issubdtype(arr.dtype, np.integer):
        raise ValueError(
            f"integer arrays must be uint8 (0..255), got {arr.dtype}; use arr.astype(np.uint8) "
            "when the values are 0..255, or arr / 65535.0 for 16-bit images"
        )
    raise ValueError(f"unsupported array dtype {arr.dtype}; pass uint8 (0..255) or float in [0, 1]")


def upright(image: Image.Image) -> Image.Image:
    """``image`` turned as its EXIF Orientation tag says (Pillow's ``ImageOps.exif_transpose``);
    the image itself when it has no such tag."""
    try:
        orientation = image.getexif().get(0x0112, 1)
    except (
        OSError,
        ValueError,
        SyntaxError,
    ):  # an unreadable EXIF block: keep the pixels as stored
        return image
    if orientation in (None, 1):
        return image
    return ImageOps.exif_transpose(image)


def open_image(path: str | os.PathLike[str]) -> Image.Image:
    """Open an image file fully (the file is closed on return), turned upright by its EXIF
    orientation (``upright``).

    Refused with a ``ValueError`` saying what to do: an empty file, a file PIL cannot identify, a
    truncated or damaged file, and an image larger than PIL's decompression-bomb limit
    (``Image.MAX_IMAGE_PIXELS``, refused from its header, before any pixel is decoded).
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such image file; check the path")
    if p.is_dir():
        raise ValueError(f"{p} is a directory; pass the path of one image file")
    if p.stat().st_size == 0:
        raise ValueError(f"{p} is an empty file (0 bytes); pass a PNG/JPEG/... image file")
    try:
        with warnings.catch_warnings():  # the size check below says it instead of PIL's warning
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(p)  # reads the header only
        with im:
            limit = Image.MAX_IMAGE_PIXELS
            if limit is not None and im.width * im.height > limit:
                raise Image.DecompressionBombError(
                    f"{im.width}x{im.height} = {im.width * im.height} pixels, over "
                    f"PIL.Image.MAX_IMAGE_PIXELS = {limit}"
                )
            im.load()
            return upright(im.copy())
    except UnidentifiedImageError as e:
        raise ValueError(f"{p} is not an image PIL can read ({e}); pass a PNG/JPEG/... file") from e
    except Image.DecompressionBombError as e:
        raise ValueError(
            f"{p} is too large to decode safely ({e}); downscale the file first (e.g. "
            "`convert big.png -resize 4096x4096 small.png`), or raise PIL.Image.MAX_IMAGE_PIXELS "
            "if you trust it and have the memory"
        ) from e
    except (OSError, SyntaxError) as e:  # truncated or corrupt data (PIL raises both)
        raise ValueError(
            f"{p} is truncated or damaged ({e}); re-export or re-download the image"
        ) from e


def to_rgb(image: ImageLike, background: Sequence[int] = WHITE) -> Image.Image | np.ndarray:
    """Any accepted single image -> an RGB PIL image or a float32 ``HxWx3`` array in [0, 1]."""
    if isinstance(image, Image.Image):
        return pil_to_rgb(image, background)
    if isinstance(image, np.ndarray):
        return array_to_rgb(image, background)
    if isinstance(image, str | os.PathLike):
        return pil_to_rgb(open_image(image), background)
    if isinstance(image, torch.Tensor):
        raise TypeError(
            "got a torch.Tensor; pass a numpy HxWxC image (t.permute(1, 2, 0).numpy() for a CxHxW "
            "tensor), or call the encoder's forward() with already normalised pixel_values"
        )
    raise TypeError(
        f"cannot read an image from a {type(image).__name__}; pass a PIL image, a numpy array "
        "(HxW, HxWx3 or HxWx4), a path, or a list of these"
    )


# ---------------------------------------------------------------------------------------------
# Resize, scale, normalise


def _resample(name: str) -> Image.Resampling:
    if name not in _RESAMPLE:
        raise ValueError(f"unknown resample {name!r}; choose one of {sorted(_RESAMPLE)}")
    return _RESAMPLE[name]


def resize_rgb(rgb: Image.Image | np.ndarray, size: int, resample: str = "bicubic") -> np.ndarray:
    """Square-resize an RGB image (from ``to_rgb``): a ``size x size x 3`` array, uint8 for a PIL
    input (resized by PIL in 8 bits), float32 in [0, 1] for a float input."""
    if size <= 0:
        raise ValueError(f"size must be > 0, got {size}")
    f = _resample(resample)
    if isinstance(rgb, Image.Image):
        if rgb.mode != "RGB":
            raise ValueError(f"resize_rgb needs an RGB image, got mode {rgb.mode!r}; use to_rgb")
        return np.asarray(rgb.resize((size, size), f), dtype=np.uint8)
    if rgb.shape[:2] == (size, size):
        return np.ascontiguousarray(rgb, dtype=np.float32)
    chans = [
        np.asarray(Image.fromarray(np.ascontiguousarray(rgb[..., c]), "F").resize((size, size), f))
        for c in range(3)
    ]
    return np.clip(np.stack(chans, axis=-1), 0.0, 1.0).astype(np.float32)


def normalise(pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``[B, S, S, 3]`` uint8 (0..255) or float ([0, 1]) pixels -> ``[B, 3, S, S]`` float32,
    ``(x / 255 - mean) / std`` per channel."""
    if pixels.ndim != 4 or pixels.shape[-1] != 3:
        raise ValueError(f"expected [B, S, S, 3] pixels, got {tuple(pixels.shape)}")
    x = pixels.permute(0, 3, 1, 2).to(torch.float32)
    if pixels.dtype == torch.uint8:
        x = x / 255.0
    m = torch.as_tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (x - m) / s


def _as_list(images: Images) -> list[ImageLike]:
    if isinstance(images, list | tuple):
        if len(images) == 0:
            raise ValueError("got an empty list of images; pass at least one image")
        for i, im in enumerate(images):
            if isinstance(im, list | tuple):
                raise TypeError(
                    f"image {i} is a {type(im).__name__}: nested lists are not images; pass a flat "
                    "list of images"
                )
        return list(images)
    return [images]


def preprocess(
    images: Images,
    config: VisionConfig | int,
    *,
    background: Sequence[int] = WHITE,
) -> torch.Tensor:
    """Images -> SigLIP ``pixel_values`` ``[B, 3, S, S]`` float32.

    ``config``: a ``VisionConfig`` (its ``pixels``, ``resample``, ``image_mean`` /
    ``image_std``) or just the side ``S`` (then bicubic, mean 0.5, std 0.5). One image gives a
    batch of one. ``background``: the colour transparent pixels are composited over.
    """
    if isinstance(config, VisionConfig):
        size, resample = config.pixels, config.resample
        mean, std = config.image_mean, config.image_std
    elif isinstance(config, int) and not isinstance(config, bool) and config > 0:
        size, resample, mean, std = config, "bicubic", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    else:
        raise TypeError(f"config must be a VisionConfig or a positive int size, got {config!r}")
    items = _as_list(images)
    many = len(items) > 1
    batch = []
    for i, im in enumerate(items):
        try:
            arr = resize_rgb(to_rgb(im, background), size, resample)
        except (ValueError, TypeError, FileNotFoundError) as e:
            if not many:
                raise
            raise type(e)(f"image {i} of {len(items)}: {e}") from e
        batch.append(arr.astype(np.float32) / 255.0 if arr.dtype == np.uint8 else arr)
    return normalise(torch.from_numpy(np.stack(batch)), mean, std)


def unnormalise(pixel_values: torch.Tensor, config: VisionConfig) -> np.ndarray:
    """``[B, 3, S, S]`` pixel_values -> ``[B, S, S, 3]`` uint8 RGB (to look at what the encoder saw)."""
    if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
        raise ValueError(f"expected [B, 3, S, S] pixel_values, got {tuple(pixel_values.shape)}")
    m = torch.as_tensor(config.image_mean).view(1, 3, 1, 1)
    s = torch.as_tensor(config.image_std).view(1, 3, 1, 1)
    x = (pixel_values.detach().float().cpu() * s + m).clamp(0, 1)
    return (x.permute(0, 2, 3, 1).numpy() * 255.0).round().astype(np.uint8)
