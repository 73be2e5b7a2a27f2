"""The image activities: fetch into the host cache (``image_fetch``), then check (``image_check``)."""

from __future__ import annotations

from functools import cached_property

from temporalio import activity

from activities.image_check import ImageCheck
from activities.image_fetch import ImageFetch
from workflows.models import CachedImage, CheckedImage, CheckImageInput, FetchImageInput


class ImageActivities(ImageFetch):
    """Configured as the transport is (its cache, its network policy); the check needs only the cache."""

    @cached_property
    def safety(self) -> ImageCheck:
        return ImageCheck(self.state, self.checkpoints)

    @activity.defn
    async def fetch_image(self, request: FetchImageInput) -> CachedImage:
        """Into the cache under its SHA-256; resumed after a crash, once per image per host."""
        return await self.fetch(request)

    @activity.defn
    async def check_image(self, request: CheckImageInput) -> CheckedImage:
        """Decide from the file's own header what it is, refuse what could reach outside it."""
        return await self.safety.check(request)
