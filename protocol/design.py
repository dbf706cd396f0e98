"""Everything the Design node answers on ``sy.cmd.design.<verb>``."""

from __future__ import annotations

from protocol.api import ApiPackageCreated, ApiPackageList, CreateApiPackage, ListApiPackages
from protocol.base import Family
from protocol.bundles import (
    BundleCreated,
    BundleList,
    CreateBundle,
    ListBundles,
    ListProjects,
    ProjectList,
)
from protocol.scenarios import (
    BuildDatasets,
    FireScenario,
    NodeCancelRun,
    NodeRunLog,
    RunAccepted,
    RunCancelled,
    RunLog,
)

DesignCommand = (CreateBundle | ListBundles | ListProjects
                 | BuildDatasets
                 | CreateApiPackage | ListApiPackages)
DesignReply = (BundleCreated | BundleList | ProjectList
               | RunAccepted
               | ApiPackageCreated | ApiPackageList)

DESIGN = Family("design", DesignCommand, DesignReply)

# Node-direct commands of the nodes that run flows (Automation and Design nodes).
RUNNER = Family("runner", FireScenario | NodeRunLog | NodeCancelRun,
                RunAccepted | RunLog | RunCancelled, direct=True)
