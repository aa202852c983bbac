"""``load_vlm``: a model name or folder → the adapter of the backend that loads it.

With ``backend="auto"`` the registered backends (:data:`~mwm.localize.vlm.base.VLM_BACKENDS`,
in registration order: open_clip, then transformers) are asked in turn; the first that
claims the name loads it. Naming a backend makes it read every name its own way.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ...errors import DataError
from ..hub import DEFAULT_VLM, RECOMMENDED_M2IB, hub_guard, read_recommended_m2ib
from .base import VLM_BACKENDS, Resolved, VLMAdapter
from .open_clip_backend import LOCAL_DIR_PREFIX

DEFAULT_MODEL = DEFAULT_VLM
AUTO = "auto"


def backend_choices() -> tuple[str, ...]:
    return (AUTO, *VLM_BACKENDS.names())


def load_vlm(name: str = DEFAULT_MODEL, *, device: str | torch.device = "cpu",
             trust_remote_code: bool = False, backend: str = AUTO) -> VLMAdapter:
    """Load a CLIP-style model by name or folder (see :mod:`mwm.localize.vlm` for names).

    A model folder's ``m2ib_recommended.json`` becomes ``adapter.m2ib_recommendation``
    (the M2IB settings a run leaves out; :meth:`~mwm.localize.m2ib.M2IBConfig.for_model`).

    Raises :class:`~mwm.errors.ModelUnavailableError` (a :class:`DataError`) when the
    weights are not in the local cache and the hub cannot be reached (at once when the
    hub does not answer: :func:`~mwm.localize.hub.hub_guard`), and
    :class:`DataError` for a model that needs remote code without
    ``trust_remote_code=True`` or is not supported.
    """
    if backend not in backend_choices():
        raise DataError(f"backend must be one of {backend_choices()}, got {backend!r}")
    if not isinstance(name, str) or not name.strip():
        raise DataError(f"model name must be a non-empty string, got {name!r}")
    name = name.strip()
    resolved = resolve(name, backend)
    folder = Path(resolved.ident).expanduser()
    is_folder = resolved.kind in ("dir", "id") and folder.is_dir()  # not a hub name
    recommended = read_recommended_m2ib(folder) if is_folder else {}
    with hub_guard():
        adapter = VLM_BACKENDS.get(resolved.backend).load(resolved, name, trust_remote_code)
    if recommended:
        adapter.m2ib_recommendation = recommended
        adapter.m2ib_recommendation_file = str(folder / RECOMMENDED_M2IB)
    return adapter.to(device)


def resolve(name: str, backend: str = AUTO) -> Resolved:
    """Which backend loads ``name``, and what it loads."""
    _check_path(name)
    candidates = VLM_BACKENDS.items() if backend == AUTO else [(backend, VLM_BACKENDS.get(backend))]
    for _, candidate in candidates:
        resolved = candidate.resolve(name, forced=backend != AUTO)
        if resolved is not None:
            return resolved
    raise DataError(f"model folder {Path(name).expanduser()} holds neither open_clip_config.json "
                    "(open_clip) nor config.json (transformers).")


def _check_path(name: str) -> None:
    """A name that points at a folder must point at an existing one."""
    if name.startswith(LOCAL_DIR_PREFIX):
        path = Path(name[len(LOCAL_DIR_PREFIX):]).expanduser()
        if not path.is_dir():
            raise DataError(f"model folder {path} not found (from {name!r}).")
        return
    path = Path(name).expanduser()
    looks_like_path = name.startswith(("/", "./", "../", "~")) or (os.sep != "/" and os.sep in name)
    if looks_like_path and not path.is_dir():
        raise DataError(f"model folder {path} not found.")
