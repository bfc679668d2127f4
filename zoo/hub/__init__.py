"""The model zoo: named, hash-pinned adapters and backbone weights, and how to fetch them.

A **registry** is a JSON file (local path or URL)::

    {"format": 1,
     "entries": {
       "vit-demo-lora": {
         "kind": "adapter",                       # or "backbone" (upstream weights)
         "backbone": {"family": "vit", "model": "vit_tiny_patch16_224",
                      "weights_tag": "file:vit_demo.safetensors", "kwargs": {...}, "fingerprint": "..."},
         "method": [{"name": "lora", "config": {"rank": 8, ...}}],
         "task": {"name": "dsprites_loc"}, "metrics": {"val/acc": 0.91}, "licence": "Apache-2.0",
         "files": [{"name": "adapter.safetensors", "sha256": "<64 hex>", "size": 12345,
                    "sources": [{"hf_repo": "org/repo", "filename": "x/adapter.safetensors", "revision": "main"},
                                {"url": "https://example.org/zoo/x/adapter.safetensors"},
                                {"path": "zoo/x/adapter.safetensors"}]}, ...]}}}

Sources are tried in order. ``url`` may be ``http(s)://``, ``file://`` or relative to the registry's
own location (so a lab can serve ``registry.json`` next to its artifacts from any static server);
``path`` is a local path relative to the registry file.

Registries read, later ones overriding earlier names: the project's ``checkpoints/registry.json``,
the quickstart's ``checkpoints/local_registry.json`` (written by ``make demo``), every location in
``$ADAPTERZOO_REGISTRY`` (separated by ``:``/``;``/``,``; URLs allowed) and those added with
:func:`add_registry`.

Downloads go to ``$ADAPTERZOO_HOME`` (default: the user cache dir, e.g. ``~/.cache/adapterzoo``) as
``entries/<name>/<digest>/<files>``. Each file is streamed to a ``.part`` file (resumed with an HTTP
``Range`` request after an interrupted download), its size and sha256 are checked, and only then is
it renamed into place; a per-entry file lock lets several processes (DDP ranks) ask for the same
entry at once. A file whose hash does not match is deleted and the error shows both hashes.
``ADAPTERZOO_OFFLINE=1`` or ``HF_HUB_OFFLINE=1`` forbid network access (local sources still work).
Nothing is ever unpickled: adapters are safetensors, upstream weights safetensors or
``torch.load(weights_only=True)``.

The package: :mod:`zoo.hub.registry` (entry format, registry locations, look-ups), :mod:`zoo.hub.fetch`
(downloads and verification), :mod:`zoo.hub.load` (``resolve``, ``from_zoo``), :mod:`zoo.hub.publish`
(``publish_run``, ``publish_backbone``, ``add_entry``) and :mod:`zoo.hub.cards` (model cards).
"""
from __future__ import annotations

from zoo.hub.cards import model_card
from zoo.hub.fetch import cached_file_ok, check_entry_artifact, download, entry_dir, is_cached, sha256_file, verify
from zoo.hub.load import build_backbone, find_backbone_entry, from_zoo, resolve, resolve_init, weights_file
from zoo.hub.publish import add_entry, publish_backbone, publish_run
from zoo.hub.registry import (
    ENV_HOME, ENV_OFFLINE, ENV_REGISTRY, KINDS, LOCAL_REGISTRY, PROJECT_REGISTRY, REGISTRY_FORMAT, REPO_ROOT, ZOO_PREFIX,
    DownloadError, Entry, EntryNotFoundError, FileSpec, HubError, IntegrityError, OfflineError, RegistryError, add_registry,
    cache_dir, check_plain_name, entries, entry_errors, get_entry, is_offline, list_entries, load_registry, registry_errors,
    registry_locations,
)

__all__ = [
    "Entry", "FileSpec", "HubError", "EntryNotFoundError", "RegistryError", "OfflineError", "DownloadError",
    "IntegrityError", "add_entry", "add_registry", "build_backbone", "cache_dir", "download", "entries",
    "entry_dir", "find_backbone_entry", "from_zoo", "get_entry", "is_cached", "is_offline", "list_entries",
    "load_registry", "publish_backbone", "publish_run", "registry_locations", "resolve", "resolve_init",
    "sha256_file", "verify", "model_card", "check_entry_artifact", "weights_file",
    "check_plain_name", "cached_file_ok", "registry_errors", "entry_errors",
]
