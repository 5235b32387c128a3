"""The offline tools' tests build their archives and trees with the data layer's generators (tests/data)."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data"))
