"""The Airflow plugins in plugins/, loaded the way Airflow loads them (the plugins folder on
sys.path). Importing tests.dags.conftest first points Airflow at a throw-away home."""

from __future__ import annotations

import sys

from tests.dags.conftest import (  # noqa: F401  (fixtures and the throw-away AIRFLOW_HOME)
    PLUGINS_DIR,
    _undo_airflow_logging,
)

if str(PLUGINS_DIR) not in sys.path:
    sys.path.append(str(PLUGINS_DIR))  # as Airflow does with [core] plugins_folder
