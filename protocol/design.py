"""Everything the Design node answers on ``sy.cmd.design.<verb>``."""

from __future__ import annotations

from protocol.base import Family
from protocol.bundles import (
    BundleCreated,
    BundleList,
    CreateBundle,
    ListBundles,
    ListProjects,
    ProjectList,
)

DesignCommand = CreateBundle | ListBundles | ListProjects
DesignReply = BundleCreated | BundleList | ProjectList

DESIGN = Family("design", DesignCommand, DesignReply)
