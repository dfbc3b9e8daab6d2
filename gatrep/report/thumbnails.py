"""Thumbnails of the page's images: fetched in parallel, cropped, JPEG-encoded and embedded within a byte budget."""

from __future__ import annotations

import base64
import concurrent.futures
import io as bytes_io
import re

from PIL import Image

from gatrep import images, schemas
from gatrep.report.html import esc, placeholder


def thumbnail_jpeg(uri: str, px: int, quality: int, max_bytes: int, max_pixels: int) -> tuple[bytes | None, str]:
    """(JPEG bytes of a `px`-square centre crop, '') or (None, why not): never raises.

    Reading and decoding go through gatrep.images, so size limits, EXIF orientation and odd modes are handled
    exactly as the embedding stage handles them; a file over `max_bytes` or `max_pixels` is not decoded.
    """
    data, refused = images.read_file(uri, max_bytes)
    if refused is not None or data is None:
        return None, refused.status if refused else schemas.UNREADABLE
    decoded = images.decode(data, images.Preprocess(size=px, crop_fraction=1.0), max_pixels)
    if decoded.pixels is None:
        return None, decoded.status
    pixels = decoded.pixels[:, :, 0] if decoded.pixels.shape[2] == 1 else decoded.pixels
    out = bytes_io.BytesIO()
    try:
        Image.fromarray(pixels).save(out, format="JPEG", quality=quality, optimize=True)
    except Exception:  # an encoder failure must cost one thumbnail, not the report (it runs in a thread pool)
        return None, schemas.DECODE_ERROR
    return out.getvalue(), ""


class Thumbnails:
    """Thumbnails by token: rendering asks for `img(uri)` and gets a marker; `fill` fetches every URI in parallel
    and puts data-URI <img> tags (or placeholders) in place, in page order, until the byte budget is spent."""

    def __init__(self, px: int, quality: int, budget_bytes: int, max_bytes: int, max_pixels: int,
                 threads: int = 8) -> None:
        self.px, self.quality, self.budget = px, quality, budget_bytes
        self.max_bytes, self.max_pixels, self.threads = max_bytes, max_pixels, max(1, threads)
        self.requests: list[tuple[str | None, str, str]] = []  # (uri, alt text, placeholder label)
        self.stats = {"requested": 0, "embedded": 0, "placeholders": 0, "over_budget": 0, "bytes": 0}

    def img(self, uri: str | None, alt: str, missing: str = "no image") -> str:
        """A marker for one thumbnail of `uri` (None: a placeholder labelled `missing`)."""
        self.requests.append((uri, alt, missing))
        return f"<!--thumb:{len(self.requests) - 1}-->"

    def _fetch_all(self) -> dict[str, tuple[bytes | None, str]]:
        uris = sorted({uri for uri, _, _ in self.requests if uri})
        # Threads, not processes: the work is mostly waiting on reads (object stores), and PIL releases the GIL.
        with concurrent.futures.ThreadPoolExecutor(self.threads) as pool:
            found = pool.map(lambda u: thumbnail_jpeg(u, self.px, self.quality, self.max_bytes, self.max_pixels),
                             uris)
            return dict(zip(uris, found, strict=True))

    def _tag(self, uri: str | None, alt: str, missing: str, fetched: dict[str, tuple[bytes | None, str]]) -> str:
        self.stats["requested"] += 1
        jpeg, why = fetched.get(uri, (None, missing)) if uri else (None, missing)
        if jpeg is not None:
            encoded = base64.b64encode(jpeg).decode("ascii")
            if self.stats["bytes"] + len(encoded) <= self.budget:
                self.stats["bytes"] += len(encoded)
                self.stats["embedded"] += 1
                return (f'<img class="th" width="{self.px}" height="{self.px}" alt="{esc(alt)}" title="{esc(alt)}" '
                        f'src="data:image/jpeg;base64,{encoded}">')
            self.stats["over_budget"] += 1
            why = "over budget"
        self.stats["placeholders"] += 1
        return placeholder(why, self.px, f"{alt}: {why}")

    def fill(self, page: str) -> str:
        """`page` with every marker replaced by its thumbnail or placeholder."""
        fetched = self._fetch_all()
        tags = [self._tag(uri, alt, missing, fetched) for uri, alt, missing in self.requests]
        return re.sub(r"<!--thumb:(\d+)-->", lambda m: tags[int(m.group(1))], page)


def figure(thumbs: Thumbnails, uri: str | None, caption: str, alt: str, missing: str = "no image",
           css: str = "") -> str:
    """A thumbnail with an (already escaped) caption under it."""
    cls = f' class="{css}"' if css else ""
    return f"<figure{cls}>{thumbs.img(uri, alt, missing)}<figcaption>{caption}</figcaption></figure>"
