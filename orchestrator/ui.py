"""What `make ui` prints before it serves the store: the link to the newest sweep's parent run in the MLflow UI.

    python -m orchestrator.ui    # the store of $MLFLOW_TRACKING_URI (default: mlflow/mlflow.db); the link's host
                                 # is $SAE_FRONTIER_UI_URL (default http://127.0.0.1:5000), which `make ui` sets
"""

from __future__ import annotations

import sys

from orchestrator.spec import default_tracking_uri, sqlite_path
from orchestrator.tracking import newest_sweep_url


def main() -> int:
    uri = default_tracking_uri()
    db = sqlite_path(uri)
    try:
        url = None if db is not None and not db.exists() else newest_sweep_url(uri)  # never create an empty store
    except Exception as err:  # noqa: BLE001 - a link is a courtesy: `make ui` serves the store regardless
        print(f"no link to the newest sweep ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})")
        return 0
    print(f"the newest sweep:  {url}" if url else f"no sweep in {uri} yet (make frontier runs one)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
