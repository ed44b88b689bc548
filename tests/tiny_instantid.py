"""A tiny InstantID (face adapter + IdentityNet) for the tiny SDXL in the published InstantX/InstantID layout:
the product's builders (engine/tiny/adapters.py documents the layout, read in github.com/InstantID/InstantID
at 2145b67 and diffusers 0.42 loaders/unet.py). Tiny sizes: dim 64, heads 1, 16 queries, embedding 512."""

from __future__ import annotations

from engine.tiny.adapters import FACE_EMBEDDING_DIM as EMBEDDING_DIM  # noqa: F401
from engine.tiny.adapters import IDENTITYNET_FOLDER as CONTROLNET_FOLDER  # noqa: F401
from engine.tiny.adapters import INSTANTID_QUERIES as NUM_QUERIES  # noqa: F401
from engine.tiny.adapters import INSTANTID_SAFE_WEIGHT_NAME as SAFE_WEIGHT_NAME  # noqa: F401
from engine.tiny.adapters import INSTANTID_WEIGHT_NAME as WEIGHT_NAME  # noqa: F401
from engine.tiny.adapters import RESAMPLER_DEPTH as DEPTH  # noqa: F401
from engine.tiny.adapters import DIM_HEAD, nested, save_tiny_identitynet, save_tiny_instantid, tiny_instantid_state_dict  # noqa: F401
