"""The image activities: fetch into the host cache (``image_fetch``), then check (``image_check``)."""

from __future__ import annotations

from pathlib import Path

from temporalio import activity

from activities.checkpoints import Checkpoints
from activities.glance import GlanceEndpoint
from activities.image_check import ImageCheck
from activities.image_fetch import ImageFetch
from activities.network import AddressPolicy
from activities.state import StateDir
from workflows.models import CachedImage, CheckedImage, CheckImageInput, FetchImageInput


class ImageActivities:
    def __init__(
        self,
        state: StateDir,
        checkpoints: Checkpoints | None = None,
        read_timeout_seconds: float = 60.0,
        file_image_dir: Path | None = None,
        glance: GlanceEndpoint | None = None,
        address_policy: AddressPolicy | None = None,
    ) -> None:
        self.state = state
        checkpoints = checkpoints or Checkpoints()
        self.transport = ImageFetch(
            state, checkpoints, read_timeout_seconds, file_image_dir, glance, address_policy
        )
        self.safety = ImageCheck(state, checkpoints)

    @activity.defn
    async def fetch_image(self, request: FetchImageInput) -> CachedImage:
        """Into the cache under its SHA-256; resumed after a crash, once per image per host."""
        return await self.transport.fetch(request)

    @activity.defn
    async def check_image(self, request: CheckImageInput) -> CheckedImage:
        """Decide from the file's own header what it is, refuse what could reach outside it."""
        return await self.safety.check(request)
