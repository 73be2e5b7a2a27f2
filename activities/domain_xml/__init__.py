"""Reading and editing libvirt domain XML: the one place that parses a definition.

Pure functions over ``ElementTree`` elements, no libvirt calls: the libvirt layer
(``activities/libvirt_domain.py``) fetches the XML and applies what these return.
"""

from activities.domain_xml.devices import (
    GUEST_AGENT_CHANNEL,
    IDENTITY_NAMESPACE,
    IMAGE_NAMESPACE,
    IMAGE_PREFIX,
    SEED_ALIAS,
    SerialLog,
    checkpoint_covers,
    current_identity,
    has_agent_channel,
    has_pty_console,
    image_record,
    seed_disk,
    seed_file,
    serial_log,
    with_seed,
)
from activities.domain_xml.disks import (
    DISK_FORMATS,
    RootDisk,
    boot_sequence,
    chain,
    disk_element,
    disk_files,
    parse,
    rebuilt_disk,
    root_disk,
    root_disk_element,
    step_root_disk,
    to_string,
    with_disk,
)
from activities.domain_xml.sandbox import description_of, sandbox_definition

__all__ = [
    "DISK_FORMATS",
    "GUEST_AGENT_CHANNEL",
    "IDENTITY_NAMESPACE",
    "IMAGE_NAMESPACE",
    "IMAGE_PREFIX",
    "SEED_ALIAS",
    "RootDisk",
    "SerialLog",
    "boot_sequence",
    "chain",
    "checkpoint_covers",
    "current_identity",
    "description_of",
    "disk_element",
    "disk_files",
    "has_agent_channel",
    "has_pty_console",
    "image_record",
    "parse",
    "rebuilt_disk",
    "root_disk",
    "root_disk_element",
    "sandbox_definition",
    "seed_disk",
    "seed_file",
    "serial_log",
    "step_root_disk",
    "to_string",
    "with_disk",
    "with_seed",
]
