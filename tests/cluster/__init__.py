"""The cluster tests import the launcher's modules (scripts/ is a folder on the path, not a
package) by name, as the cluster's own processes import the hostname callable."""

import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))
