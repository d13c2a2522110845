"""Shared test setup. Area-specific fixtures live in their own test modules."""

import os

# No model hub here: everything loads from local directories or packaged weights.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
