"""Console entry points: EV_Central, EV_CP_M, EV_CP_E, EV_Driver and evcharging.

Each program's flags and wiring live in its ``*_system`` module; this file
only dispatches, so ``--help`` of one program never imports the others.
"""

from __future__ import annotations

import sys


def central_main(argv: list[str] | None = None) -> int:
    from supervisors.central_system import main

    return main(sys.argv[1:] if argv is None else argv)


def monitor_main(argv: list[str] | None = None) -> int:
    from supervisors.monitor_system import main

    return main(sys.argv[1:] if argv is None else argv)


def engine_main(argv: list[str] | None = None) -> int:
    from supervisors.engine_system import main

    return main(sys.argv[1:] if argv is None else argv)


def driver_main(argv: list[str] | None = None) -> int:
    from supervisors.driver_system import main

    return main(sys.argv[1:] if argv is None else argv)


def launcher_main(argv: list[str] | None = None) -> int:
    from supervisors.launcher import main

    return main(sys.argv[1:] if argv is None else argv)
