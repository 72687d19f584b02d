"""Print pip constraints that pin each runtime dependency of pyproject.toml to its floor (``>=X`` -> ``==X``), for
``make test-min``. torch and torchvision stay as pip resolves them (this machine's wheels): their floors' CPU builds
are not on PyPI, whose torch 2.6 wheels bring gigabytes of CUDA libraries."""

import re
import sys
from pathlib import Path

import tomllib

UNPINNED = {"torch", "torchvision"}

project = tomllib.loads(Path(sys.argv[1] if len(sys.argv) > 1 else "pyproject.toml").read_text())["project"]
for requirement in project["dependencies"]:
    match = re.fullmatch(r"([A-Za-z0-9_.\-]+)(\[[^\]]*\])?\s*>=\s*([^,;\s]+).*", requirement)
    if match is None:
        sys.exit(f"no floor in dependency {requirement!r}: every runtime dependency needs a >= floor")
    name, _, floor = match.groups()
    if name not in UNPINNED:
        print(f"{name}=={floor}")
