"""Image loading and the two preprocessing paths of NExT-Chat.

* Vision tower: centered pad-to-square with the checkpoint's ``vision.pad_color`` (white
  for NExT-Chat, whose ``Expand2square`` follows Shikra), resize to the tower's input size,
  CLIP normalization.
* SAM: longest side resized to ``sam.image_size``, SAM normalization, centered padding to
  a square (zeros after normalization, i.e. the mean color) - the same centered placement
  as the square frame, so boxes move between the frames through ``frames`` alone.

Geometry (offsets, scales) comes from :mod:`nextchat_core.frames`; nothing here converts
coordinates.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .config import NextChatConfig
from .frames import SamGeometry, SquareGeometry

# Decompression-bomb guard: refuse images above this many pixels (PIL's default warns at
# 89 M and raises at 179 M; a labeling backend should fail fast and clearly instead).
DEFAULT_MAX_IMAGE_PIXELS = 64_000_000


def max_image_pixels() -> int:
    """The pixel limit: ``NEXTCHAT_MAX_IMAGE_PIXELS`` when set (read at each call, so
    importing this module reads nothing), else :data:`DEFAULT_MAX_IMAGE_PIXELS`."""
    raw = os.environ.get("NEXTCHAT_MAX_IMAGE_PIXELS", "").strip()
    if not raw:
        return DEFAULT_MAX_IMAGE_PIXELS
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"NEXTCHAT_MAX_IMAGE_PIXELS must be an integer, got {raw!r}") from None


# Longest side over shortest: beyond this the short side vanishes in the model's frames
# (a 40000x40 strip is 1 px tall after SAM's resize to 1024) and the square it is padded
# to costs max(W, H)^2 pixels however small the file.
DEFAULT_MAX_ASPECT_RATIO = 100.0


def max_aspect_ratio() -> float:
    """``NEXTCHAT_MAX_ASPECT_RATIO`` when set (read at each call), else the default."""
    raw = os.environ.get("NEXTCHAT_MAX_ASPECT_RATIO", "").strip()
    if not raw:
        return DEFAULT_MAX_ASPECT_RATIO
    try:
        value = float(raw)
    except ValueError:
        value = 0.0
    if value < 1:
        raise ValueError(f"NEXTCHAT_MAX_ASPECT_RATIO must be a number >= 1, got {raw!r}")
    return value


def check_image_size(width: int, height: int, *, name: str = "image") -> None:
    """Raise ``ValueError`` (naming the limit and its setting) for an image the model
    cannot take: zero-sized, above the pixel limit, so elongated that its padded square
    (``max(W, H)^2``, what the vision frame allocates) is above it, or beyond the aspect
    ratio limit. Called before any pixel is decoded or allocated."""
    limit = max_image_pixels()
    if width < 1 or height < 1:
        raise ValueError(f"{name} is {width}x{height}: an image needs at least 1x1 pixels")
    if width * height > limit:
        raise ValueError(
            f"{name} is {width}x{height} = {width * height} pixels, above the limit of "
            f"{limit}; downscale it or raise NEXTCHAT_MAX_IMAGE_PIXELS"
        )
    ratio = max(width, height) / min(width, height)
    side = max(width, height)
    if side * side > limit or ratio > max_aspect_ratio():
        raise ValueError(
            f"{name} is {width}x{height}, an aspect ratio of {ratio:.0f}:1; the model pads "
            f"images to a square ({side}x{side} = {side * side} pixels) and allows at most "
            f"{limit} pixels there (NEXTCHAT_MAX_IMAGE_PIXELS) and {max_aspect_ratio():g}:1 "
            "(NEXTCHAT_MAX_ASPECT_RATIO): crop it or split it into tiles"
        )


def load_image(source: Any) -> Image.Image:
    """Open an image from a path, bytes, a file object, a PIL image or an ``HxWx3`` uint8
    array; apply its EXIF orientation and convert to 8-bit RGB.

    Handles palette, CMYK, 16-bit, grayscale and alpha images. Raises ``ValueError`` for
    corrupt, truncated or oversized (decompression-bomb) data and ``TypeError`` for a
    source of another kind.
    """
    if isinstance(source, Image.Image):
        check_image_size(source.width, source.height)
        img = source
    elif isinstance(source, np.ndarray):
        if source.dtype != np.uint8 or source.ndim != 3 or source.shape[2] != 3:
            raise TypeError(
                f"an array image must be HxWx3 uint8 RGB, got shape {source.shape} dtype {source.dtype}"
            )
        check_image_size(source.shape[1], source.shape[0], name="the array image")
        return Image.fromarray(source)
    elif isinstance(source, str | os.PathLike | bytes | bytearray) or hasattr(source, "read"):
        img = _open(source)
    else:
        raise TypeError(
            "image must be a path, bytes, a file object, a PIL.Image or an HxWx3 uint8 "
            f"array, got {type(source).__name__}"
        )
    return _to_rgb(img)


def _open(source: Any) -> Image.Image:
    name = str(source) if isinstance(source, str | os.PathLike) else "<bytes>"
    if isinstance(source, str | os.PathLike) and not Path(source).is_file():
        raise FileNotFoundError(f"image file not found: {source}")
    fp = io.BytesIO(source) if isinstance(source, bytes | bytearray) else source
    try:
        try:
            img = Image.open(fp)
        except Image.DecompressionBombError as exc:
            # Pillow's own guard (at twice Image.MAX_IMAGE_PIXELS) fires before ours can
            # read the size; say it in this product's terms.
            raise ValueError(
                f"image {name} is above the limit of {max_image_pixels()} pixels "
                f"(NEXTCHAT_MAX_IMAGE_PIXELS; {exc}); downscale it"
            ) from None
        w, h = img.size
        check_image_size(w, h, name=f"image {name}")
        img.load()  # decode now so truncation errors surface here, not later
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ValueError(f"cannot decode image {name}: {exc} (expected a PNG/JPEG/...)") from exc
    return img


def _to_rgb(img: Image.Image) -> Image.Image:
    img = ImageOps.exif_transpose(img) or img
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit grayscale: scale the actual range to 8 bits rather than clipping.
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        img = Image.fromarray(arr.astype(np.uint8), mode="L")
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img)
    return img.convert("RGB")


@dataclass
class ProcessedImage:
    """One image resized for the model, still 8-bit (normalization happens on the device
    in :meth:`ImageProcessor.tensors`, where float work is cheap).

    ``vision``: ``VxVx3`` uint8, the vision-tower frame (centered pad to square with the
    pad colour, resized to V). ``sam``: ``hxwx3`` uint8, the image with its longest side
    resized to S (placed on the SAM canvas by ``tensors``). ``width``/``height``: the
    EXIF-transposed original size in pixels.
    """

    vision: np.ndarray
    sam: np.ndarray
    width: int
    height: int


class ImageProcessor:
    """Turns RGB images into the vision-tower and SAM inputs of one config."""

    def __init__(self, config: NextChatConfig) -> None:
        self.vision_size = config.vision.image_size
        self.sam_size = config.sam.image_size
        self.mean = tuple(config.vision.image_mean)
        self.pad_color = tuple(int(c) for c in config.vision.pad_color)
        self.std = tuple(config.vision.image_std)
        self.sam_mean = tuple(config.sam.pixel_mean)
        self.sam_std = tuple(config.sam.pixel_std)

    def __call__(self, image: Any) -> ProcessedImage:
        img = load_image(image)
        return ProcessedImage(
            vision=self.vision_resize(img),
            sam=self.sam_resize(img),
            width=img.width,
            height=img.height,
        )

    def vision_resize(self, img: Image.Image) -> np.ndarray:
        """``VxVx3`` uint8: centered pad to square with the pad colour, bicubic resize."""
        g = SquareGeometry(img.width, img.height)
        square = Image.new("RGB", (g.side, g.side), self.pad_color)
        square.paste(img, (g.pad_x, g.pad_y))
        square = square.resize((self.vision_size, self.vision_size), Image.Resampling.BICUBIC)
        return np.array(square)  # writable, so torch.from_numpy shares it without a warning

    def sam_resize(self, img: Image.Image) -> np.ndarray:
        """``hxwx3`` uint8: longest side resized to S (bilinear), as SAM's ResizeLongestSide."""
        g = SamGeometry(img.width, img.height, self.sam_size)
        return np.array(img.resize((g.new_width, g.new_height), Image.Resampling.BILINEAR))

    def tensors(
        self,
        processed: list[ProcessedImage],
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        sam: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Batch tensors on ``device``: ``Bx3xVxV`` CLIP-normalized vision inputs and (with
        ``sam``) ``Bx3xSxS`` SAM-normalized inputs, centered with zero (= mean) padding."""
        vision = torch.from_numpy(np.stack([p.vision for p in processed])).to(device)
        mean = torch.tensor(self.mean, device=device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=device).view(1, 3, 1, 1)
        pixel_values = ((vision.permute(0, 3, 1, 2).float() / 255.0 - mean) / std).to(dtype)
        if not sam:
            return pixel_values, None
        s = self.sam_size
        out = torch.zeros(len(processed), 3, s, s, device=device, dtype=torch.float32)
        sam_mean = torch.tensor(self.sam_mean, device=device).view(3, 1, 1)
        sam_std = torch.tensor(self.sam_std, device=device).view(3, 1, 1)
        for i, p in enumerate(processed):
            g = SamGeometry(p.width, p.height, s)
            x = torch.from_numpy(p.sam).to(device).permute(2, 0, 1).float()
            out[i, :, g.pad_y : g.pad_y + g.new_height, g.pad_x : g.pad_x + g.new_width] = (
                x - sam_mean
            ) / sam_std
        return pixel_values, out.to(dtype)
