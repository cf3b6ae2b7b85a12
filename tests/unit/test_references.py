"""Reference images: decoding checks, data: URLs, and loading from a real local server."""

from __future__ import annotations

import base64
import io
import struct
import threading
import zlib
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from PIL import Image

from fluxserve.errors import FetchError, ReferenceImageError, UnsafeURLError
from fluxserve.net_policy import NetPolicy
from fluxserve.netguard import guarded_client
from fluxserve.references import (
    MAX_REFERENCE_IMAGES,
    decode_data_url,
    decode_image,
    load_references,
)

LOOPBACK_OK = NetPolicy(allow_private_networks=True)
MAX_BYTES = 1024 * 1024
MAX_PIXELS = 4096 * 4096


def encode(image: Image.Image, fmt: str, **options: Any) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


def data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return (
        struct.pack(">I", len(payload))
        + kind
        + payload
        + struct.pack(">I", zlib.crc32(kind + payload))
    )


def png_claiming(width: int, height: int) -> bytes:
    """A small PNG whose header claims width x height RGB pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", idat)
        + png_chunk(b"IEND", b"")
    )


def gif_claiming(width: int, height: int) -> bytes:
    """A GIF whose logical screen is width x height, with one 1x1 frame."""
    screen = struct.pack("<HHBBB", width, height, 0, 0, 0)
    frame = b"," + struct.pack("<HHHHB", 0, 0, 1, 1, 0) + b"\x02\x02D\x01\x00"
    return b"GIF89a" + screen + frame + b";"


def pillow_allocations() -> int | None:
    """How many images Pillow's core has allocated so far, where it says."""
    stats = getattr(Image.core, "get_stats", None)
    return None if stats is None else int(stats()["new_count"])


@pytest.fixture(scope="module")
def bomb_png() -> bytes:
    """A real 20000x20000 PNG: 400 million pixels in about 50 kB."""
    return encode(Image.new("1", (20000, 20000)), "PNG")


# -- a real HTTP server ------------------------------------------------------------------

Route = Callable[[BaseHTTPRequestHandler], None]


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = False  # joined on close: no socket outlives a test
    block_on_close = True
    routes: dict[str, Route]
    seen: list[str]

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a client that stops reading at its size limit breaks the pipe: expected


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 5
    server: _HTTPServer

    def do_GET(self) -> None:
        self.server.seen.append(self.path)
        route = self.server.routes.get(self.path)
        if route is None:
            reply(self, b"not here", "text/plain", status=404)
        else:
            route(self)

    def log_message(self, format: str, *args: object) -> None:
        pass


def reply(
    handler: BaseHTTPRequestHandler, data: bytes, content_type: str, status: int = 200
) -> None:
    handler.send_response(status)
    handler.send_header("Content-Type", content_type)
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)


def serves(data: bytes, content_type: str = "image/png") -> Route:
    return lambda h: reply(h, data, content_type)


class ImageServer:
    """Serves fixed bodies on 127.0.0.1; `url(path)` gives their address."""

    def __init__(self) -> None:
        self._httpd = _HTTPServer(("127.0.0.1", 0), _Handler)
        self._httpd.routes = {}
        self._httpd.seen = []
        self.routes = self._httpd.routes
        self.seen = self._httpd.seen
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}
        )

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}{path}"

    def __enter__(self) -> ImageServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()


@pytest.fixture
def server() -> Iterator[ImageServer]:
    with ImageServer() as srv:
        yield srv


async def load(urls: list[str], **overrides: Any) -> list[Image.Image]:
    options: dict[str, Any] = {
        "policy": LOOPBACK_OK,
        "max_bytes": MAX_BYTES,
        "max_pixels": MAX_PIXELS,
        **overrides,
    }
    async with guarded_client(options["policy"]) as client:
        return await load_references(urls, client=client, **options)


# -- decode_image --------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF"])
def test_decode_each_format(fmt: str) -> None:
    image = decode_image(encode(Image.new("RGB", (30, 20), (200, 30, 30)), fmt), max_pixels=600)
    assert (image.mode, image.size) == ("RGB", (30, 20))
    red, green, blue = image.getpixel((5, 5))  # type: ignore[misc]
    assert red > 150 and green < 80 and blue < 80


def test_rgba_png_becomes_rgb_on_white() -> None:
    rgba = Image.new("RGBA", (2, 1), (255, 0, 0, 0))
    rgba.putpixel((1, 0), (255, 0, 0, 128))
    image = decode_image(encode(rgba, "PNG"), max_pixels=10)
    assert image.mode == "RGB"
    assert image.getpixel((0, 0)) == (255, 255, 255)  # fully transparent -> white
    assert image.getpixel((1, 0)) in {(255, 127, 127), (255, 128, 128)}


def test_palette_transparency_becomes_white() -> None:
    palette = Image.new("P", (2, 2), 0)
    palette.putpalette([0, 255, 0] * 256)
    image = decode_image(encode(palette, "GIF", transparency=0), max_pixels=10)
    assert image.getpixel((0, 0)) == (255, 255, 255)


@pytest.mark.parametrize("fmt", ["GIF", "WEBP"])
def test_animation_gives_first_frame(fmt: str) -> None:
    frames = [Image.new("RGB", (8, 8), colour) for colour in [(255, 0, 0), (0, 0, 255)]]
    options: dict[str, Any] = {"save_all": True, "append_images": frames[1:]}
    if fmt == "WEBP":
        options["lossless"] = True
    image = decode_image(encode(frames[0], fmt, **options), max_pixels=64)
    assert image.getpixel((4, 4)) == (255, 0, 0)


def test_exif_orientation_is_applied() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    image = decode_image(encode(Image.new("RGB", (40, 20)), "JPEG", exif=exif), max_pixels=800)
    assert image.size == (20, 40)


def test_sixteen_bit_greyscale_is_scaled() -> None:
    grey = Image.new("I;16", (2, 1))
    grey.putpixel((0, 0), 65535)
    image = decode_image(encode(grey, "PNG"), max_pixels=10)
    assert image.getpixel((0, 0)) == (255, 255, 255)
    assert image.getpixel((1, 0)) == (0, 0, 0)


@pytest.mark.parametrize(
    "data",
    [
        b"hello, I am text pretending to be a PNG",
        b"<svg xmlns='http://www.w3.org/2000/svg'/>",
        encode(Image.new("RGB", (4, 4)), "BMP"),
        b"",
    ],
)
def test_non_images_refused(data: bytes) -> None:
    with pytest.raises(ReferenceImageError, match="not a JPEG, PNG, GIF or WebP image"):
        decode_image(data, max_pixels=100)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF"])
def test_truncated_images_refused(fmt: str) -> None:
    whole = encode(Image.effect_noise((64, 64), 50).convert("RGB"), fmt)
    with pytest.raises(ReferenceImageError, match=fmt):
        decode_image(whole[: len(whole) // 2], max_pixels=64 * 64)


def test_signature_with_garbage_refused() -> None:
    with pytest.raises(ReferenceImageError, match="not a valid PNG image"):
        decode_image(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10, max_pixels=100)


def test_pixel_limit_is_inclusive() -> None:
    data = encode(Image.new("RGB", (10, 10)), "PNG")
    assert decode_image(data, max_pixels=100).size == (10, 10)
    with pytest.raises(ReferenceImageError, match=r"10x10 \(100 pixels\), more than the 99"):
        decode_image(data, max_pixels=99)


def test_decompression_bomb_refused_before_decoding(bomb_png: bytes) -> None:
    assert len(bomb_png) < 200_000
    before = pillow_allocations()
    with pytest.raises(ReferenceImageError) as info:
        decode_image(bomb_png, max_pixels=MAX_PIXELS)
    assert str(info.value) == (
        f"PNG image is 20000x20000 (400000000 pixels), more than the {MAX_PIXELS} allowed"
    )
    # Pillow allocated no image memory: the size came from the header alone.
    assert pillow_allocations() == before


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (png_claiming(100_000, 100_000), "PNG image is 100000x100000"),
        (png_claiming(12_000, 12_000), "PNG image is 12000x12000"),  # under Pillow's limit
        (gif_claiming(65_535, 65_535), "GIF image is 65535x65535"),
    ],
)
def test_headers_claiming_huge_sizes_refused(data: bytes, words: str) -> None:
    before = pillow_allocations()
    with pytest.raises(ReferenceImageError, match=words):
        decode_image(data, max_pixels=MAX_PIXELS)
    assert pillow_allocations() == before


def test_gif_frame_enlarging_the_canvas_refused() -> None:
    # A 1x1 screen whose frame claims 60000x60000: Pillow grows the canvas while
    # reading the header, and its own bomb check fires first.
    screen = struct.pack("<HHBBB", 1, 1, 0, 0, 0)
    frame = b"," + struct.pack("<HHHHB", 0, 0, 60000, 60000, 0) + b"\x02\x02D\x01\x00"
    with pytest.raises(ReferenceImageError, match="GIF image is too large"):
        decode_image(b"GIF89a" + screen + frame + b";", max_pixels=MAX_PIXELS)


# -- decode_data_url ------------------------------------------------------------------------


def test_data_url_round_trip() -> None:
    data = encode(Image.new("RGB", (3, 3)), "PNG")
    assert decode_data_url(data_url(data), MAX_BYTES) == data
    assert decode_data_url(data_url(data, "IMAGE/PNG").replace("base64", "BASE64"), 10**6) == data


def test_data_url_tolerates_whitespace_and_missing_padding() -> None:
    data = b"\x89PNG\r\n\x1a\n12345"  # 13 bytes: base64 needs padding
    text = base64.b64encode(data).decode().rstrip("=")
    wrapped = "\n".join(text[i : i + 4] for i in range(0, len(text), 4))
    assert decode_data_url(f"data:image/png;base64,{wrapped}", 100) == data


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("data:text/plain;base64,aGVsbG8=", "must be an image, not 'text/plain'"),
        ("data:;base64,aGVsbG8=", "must be an image, not 'none'"),
        ("data:image/svg+xml;base64,PHN2Zy8+", "'image/svg\\+xml' is not supported"),
        ("data:image/png,rawbytes", "must be base64-encoded"),
        ("data:image/png;base64,@@@@", "not valid base64"),
        ("data:image/png;base64,aGVsbG8=x", "not valid base64"),
        ("data:image/png;base64", "no ','"),
        ("http://example.com/a.png", "not a data: URL"),
    ],
)
def test_bad_data_urls_refused(url: str, words: str) -> None:
    with pytest.raises(ReferenceImageError, match=words):
        decode_data_url(url, MAX_BYTES)


def test_oversized_data_url_refused() -> None:
    with pytest.raises(ReferenceImageError, match="more than 100 bytes"):
        decode_data_url(data_url(b"\0" * 101), 100)
    assert len(decode_data_url(data_url(b"\0" * 100), 100)) == 100


# -- load_references against a real server ----------------------------------------------------


async def test_load_references_all_formats_in_order(server: ImageServer) -> None:
    colours = {
        "PNG": (255, 0, 0),
        "JPEG": (0, 255, 0),
        "WEBP": (0, 0, 255),
        "GIF": (255, 255, 0),
    }
    urls = []
    for index, (fmt, colour) in enumerate(colours.items()):
        # Distinct sizes tell the images apart; paths lie about the format on purpose
        # for WebP (the content decides, not the name).
        data = encode(Image.new("RGB", (10 + index, 10), colour), fmt)
        path = f"/ref{index}.{'png' if fmt == 'WEBP' else fmt.lower()}"
        server.routes[path] = serves(data, f"image/{fmt.lower()}")
        urls.append(server.url(path))
    inline = encode(Image.new("RGB", (20, 10), (0, 255, 255)), "JPEG")
    urls.insert(2, data_url(inline, "image/jpeg"))

    images = await load(urls)

    assert [image.size for image in images] == [(10, 10), (11, 10), (20, 10), (12, 10), (13, 10)]
    assert all(image.mode == "RGB" for image in images)
    expected = [(255, 0, 0), (0, 255, 0), (0, 255, 255), (0, 0, 255), (255, 255, 0)]
    for image, colour in zip(images, expected, strict=True):
        pixel = image.getpixel((5, 5))
        assert all(abs(a - b) <= 8 for a, b in zip(pixel, colour, strict=True))  # type: ignore[arg-type]


async def test_load_references_fetches_concurrently(server: ImageServer) -> None:
    # Each handler waits until all four requests are in flight at once.
    barrier = threading.Barrier(4, timeout=5)
    data = encode(Image.new("RGB", (4, 4)), "PNG")

    def together(h: BaseHTTPRequestHandler) -> None:
        barrier.wait()
        reply(h, data, "image/png")

    for index in range(4):
        server.routes[f"/c{index}.png"] = together
    images = await load([server.url(f"/c{index}.png") for index in range(4)])
    assert len(images) == 4


async def test_text_named_png_refused(server: ImageServer) -> None:
    good = encode(Image.new("RGB", (4, 4)), "PNG")
    server.routes["/good.png"] = serves(good)
    server.routes["/fake.png"] = serves(b"just some text, honestly", "image/png")
    with pytest.raises(ReferenceImageError) as info:
        await load([server.url("/good.png"), server.url("/fake.png")])
    assert str(info.value) == (
        f"image_urls[1]: {server.url('/fake.png')}: not a JPEG, PNG, GIF or WebP image"
    )


async def test_missing_image_names_the_entry(server: ImageServer) -> None:
    server.routes["/good.png"] = serves(encode(Image.new("RGB", (4, 4)), "PNG"))
    missing = server.url("/missing.png")
    with pytest.raises(FetchError) as info:
        await load([server.url("/good.png"), missing])
    assert str(info.value) == f"image_urls[1]: could not fetch {missing}: HTTP 404 Not Found"


async def test_first_failure_by_position_is_reported(server: ImageServer) -> None:
    with pytest.raises(FetchError, match=r"^image_urls\[0\]: .*/a\.png: HTTP 404"):
        await load([server.url("/a.png"), server.url("/b.png")])


async def test_bomb_served_over_http_refused(server: ImageServer, bomb_png: bytes) -> None:
    server.routes["/bomb.png"] = serves(bomb_png)
    before = pillow_allocations()
    with pytest.raises(ReferenceImageError, match=r"^image_urls\[0\]: .*20000x20000"):
        await load([server.url("/bomb.png")])
    assert pillow_allocations() == before


async def test_oversized_download_refused(server: ImageServer) -> None:
    server.routes["/big.png"] = serves(encode(Image.effect_noise((64, 64), 50), "PNG"))
    with pytest.raises(FetchError, match=r"^image_urls\[0\]: .*larger than 100 bytes"):
        await load([server.url("/big.png")], max_bytes=100)


async def test_bad_data_url_names_the_entry(server: ImageServer) -> None:
    server.routes["/good.png"] = serves(encode(Image.new("RGB", (4, 4)), "PNG"))
    with pytest.raises(ReferenceImageError, match=r"^image_urls\[1\]: .*must be an image"):
        await load([server.url("/good.png"), "data:text/html;base64,PGI+"])
    with pytest.raises(ReferenceImageError, match=r"^image_urls\[0\]: data: URL: not a JPEG"):
        await load([data_url(b"\x00\x01not an image")])


async def test_unsafe_urls_refused(server: ImageServer) -> None:
    server.routes["/good.png"] = serves(encode(Image.new("RGB", (4, 4)), "PNG"))
    with pytest.raises(UnsafeURLError, match=r"^image_urls\[0\]: .*loopback"):
        await load([server.url("/good.png")], policy=NetPolicy())
    with pytest.raises(UnsafeURLError, match=r"^image_urls\[0\]: .*scheme 'file'"):
        await load(["file:///etc/passwd"])
    assert server.seen == []


async def test_reference_count_limit() -> None:
    assert await load([]) == []
    url = data_url(encode(Image.new("RGB", (2, 2)), "PNG"))
    images = await load([url] * MAX_REFERENCE_IMAGES)
    assert len(images) == MAX_REFERENCE_IMAGES
    with pytest.raises(ReferenceImageError, match="at most 8 reference images"):
        await load([url] * (MAX_REFERENCE_IMAGES + 1))
