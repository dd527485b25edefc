"""Print pip constraints that pin each direct dependency in pyproject.toml to its floor (`>=X`
becomes `==X`), for this platform, so pip resolves the lowest versions we claim to support."""

from __future__ import annotations

import sys
import tomllib

from packaging.requirements import Requirement

with open(sys.argv[1], "rb") as fh:
    project = tomllib.load(fh)["project"]
for line in project["dependencies"]:
    req = Requirement(line)
    if req.marker is not None and not req.marker.evaluate():
        continue
    floors = [spec.version for spec in req.specifier if spec.operator == ">="]
    if floors:
        print(f"{req.name}=={floors[0]}")
