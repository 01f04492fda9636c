"""Drawing results on images for `convserve predict --out` (Pillow only)."""
from __future__ import annotations

from PIL import Image, ImageDraw, ImageFont


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
