"""Custom search attributes, so the Web UI finds rebuilds by instance, host, image or phase.

The dev server is started with these registered (``--search-attribute NAME=Keyword``), and so is the
compose stack; :data:`ALL` lists them for both.
"""

from temporalio.common import SearchAttributeKey, SearchAttributePair, TypedSearchAttributes

from workflows.ui_text import shown_image

INSTANCE_ID = SearchAttributeKey.for_keyword("InstanceId")
HYPERVISOR_HOST = SearchAttributeKey.for_keyword("HypervisorHost")
IMAGE_ID = SearchAttributeKey.for_keyword("ImageId")
REBUILD_PHASE = SearchAttributeKey.for_keyword("RebuildPhase")

ALL = (INSTANCE_ID, HYPERVISOR_HOST, IMAGE_ID, REBUILD_PHASE)


def of_new_rebuild(instance: str, host: str, image: str) -> TypedSearchAttributes:
    """What a rebuild starts with, before its first phase: the Web UI finds it from its first moment.

    Search attributes are never encoded: an image URL's query string (a signed URL's credential) is
    replaced by its digest."""
    return TypedSearchAttributes(
        [
            SearchAttributePair(INSTANCE_ID, instance),
            SearchAttributePair(HYPERVISOR_HOST, host),
            SearchAttributePair(IMAGE_ID, shown_image(image)),
            SearchAttributePair(REBUILD_PHASE, "pending"),
        ]
    )
