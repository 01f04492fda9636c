"""JPEG structure, read from the bytes alone: where the compressed image data ends and
whether the file holds a scan for every part of the image. No pixel is decoded here.

libjpeg (under Pillow) decodes a scan that stops early without an error: it pads the
missing blocks with grey and only prints a warning, which Pillow drops. So the
completeness of a JPEG is decided in two parts. This module answers the structural
part (the file ends inside or after its scans, and its scans cover every component and,
for progressive files, every DCT coefficient down to full precision); the imaging
module checks, by decoding, that the last scan itself is whole.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

SOI = b"\xff\xd8"
EOI = b"\xff\xd9"
_EOI_CODE = 0xD9
_SOS_CODE = 0xDA
_DRI_CODE = 0xDD
_RST_CODES = frozenset(range(0xD0, 0xD8))
# Start-of-frame codes (ITU T.81, Table B.1): 0xC0-0xCF less DHT (C4), JPG (C8) and DAC (CC).
_SOF_CODES = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_PROGRESSIVE_SOF_CODES = frozenset({0xC2, 0xC6, 0xCA, 0xCE})
# Markers with no length field: RST0-RST7 (inside scans) and TEM.
_PARAMETERLESS_CODES = frozenset(range(0xD0, 0xD8)) | {0x01}
# A DCT block is 8x8 samples.
_BLOCK = 8
# The 64 coefficients of an 8x8 DCT block, in zig-zag order 0..63.
_COEFFICIENTS = frozenset(range(64))
# A marker: 0xFF, any number of 0xFF fill bytes, then a code that is neither a stuffed
# zero (0xFF 0x00 is a data byte inside a scan) nor fill.
_MARKER = re.compile(rb"\xff+([^\x00\xff])")
# Inside a scan, 0xFF 0x00 is a data byte. Masked to 0x00 0x00 (same length, so every
# offset holds), the data keeps an 0xFF only where a marker or its fill bytes are: the
# next marker is then a bytes.find away instead of a regex tried at every byte of the
# scan (0.5 ms for a 640x480 photo; `_next_marker`).
_STUFFED, _MASKED = b"\xff\x00", b"\x00\x00"


class JpegStructureError(ValueError):
    """The bytes are not a complete JPEG; the message says what is missing."""


@dataclass(frozen=True)
class _Frame:
    width: int
    height: int
    components: dict[int, tuple[int, int]]  # id -> (horizontal, vertical) sampling factor
    progressive: bool

    def mcus(self, scan_components: tuple[int, ...]) -> int:
        """MCUs in a scan (ITU T.81, A.2): one block per MCU for a single component,
        else the interleaved MCU of the largest sampling factors."""
        h_max = max(h for h, _ in self.components.values())
        v_max = max(v for _, v in self.components.values())
        if len(scan_components) == 1:
            h, v = self.components.get(scan_components[0], (h_max, v_max))
            return (_ceil_div(_ceil_div(self.width * h, h_max), _BLOCK)
                    * _ceil_div(_ceil_div(self.height * v, v_max), _BLOCK))
        return _ceil_div(self.width, _BLOCK * h_max) * _ceil_div(self.height, _BLOCK * v_max)


@dataclass(frozen=True)
class JpegBody:
    """`data[:end]` is the file up to the end of its last scan's data, EOI excluded."""

    end: int
    has_eoi: bool


def jpeg_body(data: bytes) -> JpegBody:
    """Walk the marker segments of `data` (a JPEG) up to its first EOI, or to the end of
    the data when that falls inside a scan (the file lacks only its end marker).

    Raises JpegStructureError when the data ends anywhere else (inside a header
    segment, or between segments), or when the scans present do not cover the whole
    image: a sequential file must have a scan for each component of its frame; a
    progressive one, for each component, a scan that brings every coefficient 0..63
    to full precision (successive-approximation low bit Al = 0). A progressive file cut
    between two scans is a valid-looking JPEG of lower quality: that is how it is found.
    A scan with restart intervals must hold all its restart markers: libjpeg fills the
    intervals after a cut at an interval boundary without reading a byte, so no probe
    of the data after the scan would see it.
    """
    if not data.startswith(SOI):
        raise JpegStructureError("no JPEG start marker")
    frame: _Frame | None = None
    scans: list[tuple[tuple[int, ...], int, int, int]] = []  # (components, Ss, Se, Al)
    restart_interval = 0
    restarts = 0
    in_scan = False
    pos = len(SOI)
    masked = data.replace(_STUFFED, _MASKED)
    while True:
        match = _next_marker(masked, pos)
        if in_scan and (match is None or match.group(1)[0] not in _RST_CODES):
            _check_restarts(frame, scans[-1][0], restart_interval, restarts)
        if match is None:
            if not in_scan:
                raise JpegStructureError("JPEG ends before its image data")
            # Cut inside (or right at the end of) the last scan's data. A lone 0xFF
            # there is the first half of the missing end marker.
            end = len(data)
            while end > pos and data[end - 1] == 0xFF:
                end -= 1
            body = JpegBody(end, has_eoi=False)
            break
        code = match.group(1)[0]
        if code in _PARAMETERLESS_CODES:
            restarts += in_scan and code in _RST_CODES
            pos = match.end()
            continue
        if code == _EOI_CODE:
            body = JpegBody(match.start(), has_eoi=True)
            break
        in_scan = False
        start = match.end()
        if start + 2 > len(data):
            raise JpegStructureError(f"JPEG ends inside the header of marker 0xFF{code:02X}")
        length = int.from_bytes(data[start:start + 2], "big")
        if length < 2 or start + length > len(data):
            raise JpegStructureError(
                f"JPEG segment 0xFF{code:02X} at byte {match.start()} claims {length} bytes, "
                f"{len(data) - start} remain")
        payload = data[start + 2:start + length]
        if code in _SOF_CODES:
            frame = _frame(payload, code in _PROGRESSIVE_SOF_CODES)
        elif code == _DRI_CODE and len(payload) >= 2:
            restart_interval = int.from_bytes(payload[:2], "big")
        elif code == _SOS_CODE:
            scans.append(_scan_header(payload))
            in_scan = True
            restarts = 0
        pos = start + length
    if frame is None:
        raise JpegStructureError("JPEG has no frame header")
    _check_coverage(tuple(frame.components), frame.progressive, scans)
    return body


def _next_marker(masked: bytes, pos: int) -> re.Match | None:
    """The first marker at or after `pos` in `masked` (the file with its stuffed bytes
    masked): the match `_MARKER.search(data, pos)` gives on the file itself, found
    without running the regex over the scan data."""
    while (at := masked.find(b"\xff", pos)) >= 0:
        match = _MARKER.match(masked, at)
        if match is not None:
            return match
        pos = at + 1  # an 0xFF run that ends in a masked data byte, not a marker
    return None


def _frame(payload: bytes, progressive: bool) -> _Frame:
    # SOF: precision(1) height(2) width(2) count(1), then per component id(1) HV(1) Tq(1).
    if len(payload) < 6 or len(payload) < 6 + 3 * payload[5] or payload[5] == 0:
        raise JpegStructureError("JPEG frame header is too short")
    components = {payload[6 + 3 * i]: (max(1, payload[7 + 3 * i] >> 4), max(1, payload[7 + 3 * i] & 0x0F))
                  for i in range(payload[5])}
    height, width = int.from_bytes(payload[1:3], "big"), int.from_bytes(payload[3:5], "big")
    return _Frame(width, height, components, progressive)


def _check_restarts(frame: _Frame | None, scan_components: tuple[int, ...], interval: int, restarts: int) -> None:
    """A scan of N MCUs with restart interval R carries ceil(N / R) - 1 RST markers."""
    if frame is None or interval == 0 or frame.height == 0:  # height 0: set later by DNL
        return
    expected = _ceil_div(frame.mcus(scan_components), interval) - 1
    if restarts < expected:
        raise JpegStructureError(
            f"JPEG scan stops after {restarts} of its {expected} restart intervals")


def _scan_header(payload: bytes) -> tuple[tuple[int, ...], int, int, int]:
    # SOS: count(1), 2 bytes per component (id first), then Ss(1) Se(1) Ah:Al(1).
    if len(payload) < 1 or len(payload) < 1 + 2 * payload[0] + 3:
        raise JpegStructureError("JPEG scan header is too short")
    count = payload[0]
    components = tuple(payload[1 + 2 * i] for i in range(count))
    ss, se, approximation = payload[1 + 2 * count:4 + 2 * count]
    return components, ss, se, approximation & 0x0F


def _check_coverage(frame_components: tuple[int, ...], progressive: bool,
                    scans: list[tuple[tuple[int, ...], int, int, int]]) -> None:
    if not frame_components or not scans:
        raise JpegStructureError("JPEG has no frame or no scan")
    if not progressive:
        missing = set(frame_components) - {c for components, *_ in scans for c in components}
        if missing:
            raise JpegStructureError(f"JPEG ends before the scans of components {sorted(missing)}")
        return
    final: dict[int, set[int]] = {c: set() for c in frame_components}
    for components, ss, se, al in scans:
        if al == 0:
            for c in components:
                final.setdefault(c, set()).update(range(ss, min(se, 63) + 1))
    for c in frame_components:
        if final[c] != _COEFFICIENTS:
            raise JpegStructureError(
                f"progressive JPEG ends before its scans are complete: component {c} has "
                f"{len(final[c])} of 64 coefficients at full precision")


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)
