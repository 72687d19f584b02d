"""Shard lists: a shard spec resolved to its URLs, and this process's rank in the process group.

Shards are any URLs webdataset opens (local brace patterns, ``pipe:`` commands, http(s)); local ones are checked
when the spec is resolved, so a typo fails at start-up.
"""

from __future__ import annotations

import glob
import os
from urllib.parse import urlparse
from urllib.request import url2pathname

import torch.distributed as dist
from webdataset.shardlists import expand_urls


def _is_local(url: str) -> bool:
    return urlparse(url).scheme in ("", "file")


def expand_shards(spec: str | list[str]) -> list[str]:
    """Resolve a shard spec to its list of URLs, in order.

    webdataset's syntax (``wds.shardlists.expand_urls``): brace ranges and alternatives (``d/x-{000000..000099}.tar``,
    ``{a,b}``), ``::`` between parts, ``${WDS_NAME}`` from the environment; a list is taken part by part. Local paths
    may also be shell globs, and must exist (``FileNotFoundError`` naming the pattern, so a typo fails at start-up);
    other URLs (``pipe:``, ``http(s)://``, ...) are taken as they are: webdataset opens them when they are read.
    """
    parts = [spec] if isinstance(spec, str) else list(spec)
    if not parts or not all(isinstance(p, str) and p.strip() for p in parts):
        raise FileNotFoundError(f"empty shard pattern {spec!r}")
    urls: list[str] = []
    for part in parts:
        try:
            expanded = expand_urls(part.strip())
        except AssertionError as e:  # webdataset asserts on an unset ${WDS_...} variable
            raise ValueError(f"shard pattern {part!r}: {e}") from None
        for url in expanded:
            if not _is_local(url):
                urls.append(url)
                continue
            path = os.path.expanduser(url2pathname(urlparse(url).path) if url.startswith("file:") else url)
            if glob.has_magic(path):
                matches = sorted(glob.glob(path))
                if not matches:
                    raise FileNotFoundError(f"shard pattern {part!r} matches no files (glob {path!r})")
                urls.extend(matches)
            else:
                urls.append(path)
    missing = [u for u in urls if _is_local(u) and not os.path.isfile(u)]
    if missing:
        if len(missing) == len(urls):
            raise FileNotFoundError(f"shard pattern {spec!r} matches no files (e.g. {missing[0]!r} does not exist)")
        raise FileNotFoundError(
            f"shard pattern {spec!r}: {len(missing)} of {len(urls)} shards do not exist, e.g. {missing[:3]}"
        )
    return urls


def dist_info() -> tuple[int, int]:
    """``(rank, world size)`` of the process group, ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1
