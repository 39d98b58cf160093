"""Unit-test setup for Hypothesis.

* Hypothesis keeps its storage (example database, constants cache, patches)
  in ``.hypothesis/`` under the working directory; send it to the temp dir so
  a test run leaves nothing in the repository.
* When a Hypothesis test fails, its pytest plugin imports
  ``hypothesis.extra._patching`` (libcst, which trips a DeprecationWarning from
  mypy_extensions). With ``filterwarnings = error`` that aborts the whole
  session with an INTERNALERROR instead of reporting the failure. Marking the
  module unavailable makes the plugin skip the (optional) patch suggestion.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from hypothesis.configuration import set_hypothesis_home_dir

set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "testhide-unit-hypothesis")
sys.modules.setdefault("hypothesis.extra._patching", None)  # type: ignore[arg-type]
