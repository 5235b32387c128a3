"""``python -m pipeline.study STUDY.toml ...``: see :mod:`pipeline.study.runner`."""

import sys

from pipeline.study.runner import main

sys.exit(main())
