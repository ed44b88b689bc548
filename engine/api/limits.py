"""Request bodies read with a byte limit: both APIs' uploads (server.py's presigned uploads, the Ideogram forms)."""

from __future__ import annotations

from collections.abc import AsyncIterator


class UploadTooLarge(Exception):
    """Raised while streaming a request body past the limit."""


async def limited(stream: AsyncIterator[bytes], limit: int) -> AsyncIterator[bytes]:
    """`stream`, raising UploadTooLarge as soon as more than `limit` bytes have come (nothing more is read)."""
    received = 0
    async for chunk in stream:
        received += len(chunk)
        if received > limit:
            raise UploadTooLarge
        yield chunk
