"""SCSI command emulation (SPC-5 / SBC-4) for vsand's block LUNs.

Public API::

    lu = LogicalUnit(params)                  # params: LunParams
    target = ScsiTarget({0: lu})
    result = target.execute(cmd)              # ScsiResult, or a ScsiTask generator
    sense_for_errno(errno, is_write)          # CheckCondition for a backend OSError
"""

from .sense import CheckCondition, sense_for_errno
from .target import ScsiTarget
from .types import LunParams, ScsiCommand, ScsiResult, ScsiTask, Status
from .unit import LogicalUnit

__all__ = [
    "CheckCondition",
    "LogicalUnit",
    "LunParams",
    "ScsiCommand",
    "ScsiResult",
    "ScsiTarget",
    "ScsiTask",
    "Status",
    "sense_for_errno",
]
