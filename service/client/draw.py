"""Drawing results on images for `convserve predict --out` (Pillow and numpy only)."""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# Opacity of label maps and instance masks drawn over the photo.
MASK_ALPHA = 0.5


def voc_palette(n: int = 256) -> np.ndarray:
    """uint8 [n, 3]: the PASCAL VOC colour map (class 0 black, 1 dark red, 2 green, ...),
    the usual colours of semantic label maps: bit i of the class id sets bit 7 - i//3
    of the red, green or blue channel, cycling."""
    ids = np.arange(n)
    palette = np.zeros((n, 3), dtype=np.int64)
    for shift in range(8):
        for channel in range(3):
            palette[:, channel] |= ((ids >> (3 * shift + channel)) & 1) << (7 - shift)
    return palette.astype(np.uint8)


def draw_label_map(image: Image.Image, label_map: np.ndarray, background: int | None = 0) -> Image.Image:
    """The image with its label map [H, W] (class ids, the image's size) blended over it
    in VOC colours; pixels of class ``background`` stay as they are."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    colours = voc_palette()[np.asarray(label_map) % 256].astype(np.float32)
    blended = pixels * (1 - MASK_ALPHA) + colours * MASK_ALPHA
    if background is not None:
        blended = np.where((np.asarray(label_map) == background)[..., None], pixels, blended)
    return Image.fromarray(blended.round().astype(np.uint8))


def draw_instances(image: Image.Image, instances: list[tuple[tuple[float, float, float, float], str, np.ndarray]]
                   ) -> Image.Image:
    """The image with each instance's mask (bool [H, W]) blended in its own colour, and
    its box (x1, y1, x2, y2, image pixels) and caption drawn on top."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32).copy()
    palette = voc_palette()[1:]  # skip black
    for i, (_, _, mask) in enumerate(instances):
        colour = palette[i % len(palette)].astype(np.float32)
        pixels[mask] = pixels[mask] * (1 - MASK_ALPHA) + colour * MASK_ALPHA
    out = Image.fromarray(pixels.round().astype(np.uint8))
    draw = ImageDraw.Draw(out)
    size = max(10, min(out.width, out.height) // 40)
    font = _font(size)
    for i, (box, caption, _) in enumerate(instances):
        colour = tuple(int(c) for c in palette[i % len(palette)])
        draw.rectangle(box, outline=colour, width=2)
        draw.text((box[0] + 2, max(0.0, box[1] - size - 4)), caption, fill=colour, font=font)
    return out


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has no sized default font
        return ImageFont.load_default()


def draw_labels(image: Image.Image, lines: list[str]) -> Image.Image:
    """The image with a translucent panel of text lines in its top-left corner."""
    out = image.convert("RGBA")
    size = max(12, min(out.width, out.height) // 25)
    font = _font(size)
    overlay = Image.new("RGBA", out.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    pad = size // 2
    widths = [draw.textlength(line, font=font) for line in lines] or [0]
    height = len(lines) * (size + pad // 2) + pad
    draw.rectangle([0, 0, max(widths) + 2 * pad, height], fill=(0, 0, 0, 160))
    y = pad
    for line in lines:
        draw.text((pad, y), line, fill=(255, 255, 255, 255), font=font)
        y += size + pad // 2
    return Image.alpha_composite(out, overlay).convert("RGB")


def _color(index: int) -> tuple[int, int, int]:
    """A distinct, stable color per class index (golden-ratio hue steps)."""
    import colorsys

    r, g, b = colorsys.hsv_to_rgb((index * 0.618033988749895) % 1.0, 0.85, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


def caption(name: str, score: float) -> str:
    """A box's caption: its label and score, two decimals, or two significant digits for
    a score under 0.01 (a low `--score-threshold` shows such boxes; "0.00" said nothing)."""
    return f"{name} {score:.2f}" if score >= 0.01 else f"{name} {score:.2g}"


def draw_boxes(image: Image.Image, boxes: list[tuple[list[float], str, int]]) -> Image.Image:
    """The image with each (box [x_min, y_min, x_max, y_max] in pixels, caption, class
    index) drawn as an outline in its class's color, the caption on a filled tab above
    it (inside the image when the box touches the top edge). Drawn worst first, so
    the best detections end on top."""
    out = image.convert("RGB")
    draw = ImageDraw.Draw(out)
    size = max(10, min(out.width, out.height) // 40)
    font = _font(size)
    width = max(1, min(out.width, out.height) // 200)
    for (x1, y1, x2, y2), caption, index in reversed(boxes):
        color = _color(index)
        draw.rectangle([x1, y1, x2, y2], outline=color, width=width)
        left, top, right, bottom = draw.textbbox((0, 0), caption, font=font)
        tab_h = bottom - top + 2 * width
        ty = y1 - tab_h if y1 - tab_h >= 0 else y1
        draw.rectangle([x1, ty, x1 + right - left + 2 * width, ty + tab_h], fill=color)
        draw.text((x1 + width - left, ty + width - top), caption, fill=(0, 0, 0), font=font)
    return out
