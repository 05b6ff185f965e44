"""Reading an uploaded image off a request, shared by every route that takes
one (`POST /photo`, `/detect`, `/transform`): the raw body or the first file
part of a multipart form, with the body limit enforced while it streams."""

from __future__ import annotations

from aiohttp import BodyPartReader, web

from .imaging import BadImage


async def read_image(request: web.Request, limit: int) -> bytes:
    if request.content_length is not None and request.content_length > limit:
        raise BadImage(413, f"body of {request.content_length} bytes exceeds the limit of {limit} bytes")
    if request.content_type.startswith("multipart/"):
        # curl -F file=@cat.jpg and browser forms: take the first file part.
        reader = await request.multipart()
        async for part in reader:
            if not isinstance(part, BodyPartReader):
                continue  # a nested multipart: not where a photo is
            if part.filename is not None or part.name in ("file", "image", "photo"):
                data = bytearray()
                while chunk := await part.read_chunk(1 << 16):
                    data += chunk
                    if len(data) > limit:
                        raise BadImage(413, f"image exceeds the limit of {limit} bytes")
                return bytes(data)
        raise BadImage(400, "multipart body without a file part; send the image as the raw body or as a file field")
    data = bytearray()
    async for chunk in request.content.iter_chunked(1 << 16):
        data += chunk
        if len(data) > limit:
            raise BadImage(413, f"body exceeds the limit of {limit} bytes")
    return bytes(data)
