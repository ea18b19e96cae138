"""The built-in device models and the registry that ``--device TYPE@...`` looks types up in."""

from __future__ import annotations

from device_service.model import DeviceModel
from device_service.models.pl011 import Pl011
from device_service.models.pl031 import Pl031
from device_service.models.scratch import Scratch
from device_service.models.stub import ReadAsOnes, ReadAsZero

__all__ = ["DEVICE_TYPES", "Pl011", "Pl031", "ReadAsOnes", "ReadAsZero", "Scratch"]

#: Device type name (as in ``--device pl011@0x09000000``) to model class.
DEVICE_TYPES: dict[str, type[DeviceModel]] = {
    cls.type_name: cls for cls in (Pl011, Pl031, Scratch, ReadAsZero, ReadAsOnes)
}
