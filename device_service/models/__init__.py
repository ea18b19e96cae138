"""The built-in device models and the registry that ``--device TYPE@...`` looks types up in."""

from __future__ import annotations

from device_service.model import DeviceModel
from device_service.models.dma_probe import DmaProbe
from device_service.models.fw_cfg import FwCfg
from device_service.models.irq_probe import IrqProbe
from device_service.models.pcie import PcieHost
from device_service.models.pflash import PFlashCfi01
from device_service.models.pl011 import Pl011
from device_service.models.pl031 import Pl031
from device_service.models.pl061 import Pl061
from device_service.models.scratch import Scratch
from device_service.models.stub import ReadAsOnes, ReadAsZero
from device_service.models.virtio_blk import VirtioBlkMmio
from device_service.models.virtio_mmio import VirtioMmio

__all__ = [
    "DEVICE_TYPES",
    "DmaProbe",
    "FwCfg",
    "IrqProbe",
    "PFlashCfi01",
    "PcieHost",
    "Pl011",
    "Pl031",
    "Pl061",
    "ReadAsOnes",
    "ReadAsZero",
    "Scratch",
    "VirtioBlkMmio",
    "VirtioMmio",
]

#: Device type name (as in ``--device pl011@0x09000000``) to model class.
DEVICE_TYPES: dict[str, type[DeviceModel]] = {
    cls.type_name: cls
    for cls in (Pl011, Pl031, Pl061, Scratch, ReadAsZero, ReadAsOnes, PFlashCfi01, FwCfg, VirtioMmio, PcieHost,
                VirtioBlkMmio, DmaProbe, IrqProbe)
}
