"""omnilabel: weak annotations to COCO instance pseudomasks, and the student that learns from them."""

from __future__ import annotations

__version__ = "0.1.0"
