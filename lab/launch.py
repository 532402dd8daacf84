"""Create a shared Optuna database's tables ahead of time (a `sweep=lr` run also does it when it starts):

    python -m lab.launch init-storage postgresql+psycopg://user@host:5432/optuna

The launchers themselves are Hydra's (conf/hydra/launcher/); what they need from the lab is lab/cluster/launchers.py.
"""

from __future__ import annotations

import logging
import sys
from typing import Sequence

from lab import LabError, report_error
from lab.cluster.launchers import init_storage

log = logging.getLogger(__name__)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        if len(args) != 2 or args[0] != "init-storage":
            raise LabError("usage: python -m lab.launch init-storage <database URL>")
        init_storage(args[1], setting="STORAGE")
    except Exception as err:  # noqa: BLE001 - the one exit path (lab.report_error)
        return report_error(err, log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
