"""Every command family, imported in one place so any command class can find its family
(``Family.of``) whatever the caller happened to import first."""

from protocol.deployer import DEPLOYER
from protocol.design import DESIGN, RUNNER
from protocol.govern import GOVERN
from protocol.system import SYSTEM

ALL = (DEPLOYER, DESIGN, RUNNER, GOVERN, SYSTEM)
