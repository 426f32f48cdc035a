"""Session-wide offline fixtures. Asset fixtures (corpus, tokenizer, tiny model) live in `_assets.py`; store fixtures
(a harvested tiny store) in `_store.py`. Nothing here touches the network."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from _assets import *  # noqa: E402,F401,F403
from _store import *  # noqa: E402,F401,F403
