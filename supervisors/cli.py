"""Console entry points: EV_Central, EV_CP_M, EV_CP_E, EV_Driver, EV_Registry, EV_W and evcharging.

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


def registry_main(argv: list[str] | None = None) -> int:
    from supervisors.registry_system import main

    return main(sys.argv[1:] if argv is None else argv)


def weather_main(argv: list[str] | None = None) -> int:
    from supervisors.weather_system import main

    return main(sys.argv[1:] if argv is None else argv)


def ocpp_main(argv: list[str] | None = None) -> int:
    from supervisors.ocpp_system import main

    return main(sys.argv[1:] if argv is None else argv)


def ocpp_sim_main(argv: list[str] | None = None) -> int:
    from supervisors.ocpp_sim import main

    return main(sys.argv[1:] if argv is None else argv)


def launcher_main(argv: list[str] | None = None) -> int:
    from supervisors.launcher import main

    return main(sys.argv[1:] if argv is None else argv)


PROGRAMS = {"central": central_main, "monitor": monitor_main, "engine": engine_main, "driver": driver_main,
            "registry": registry_main, "weather": weather_main, "ocpp": ocpp_main, "ocpp-sim": ocpp_sim_main,
            "evcharging": launcher_main}


if __name__ == "__main__":
    # ``python -m supervisors.cli PROGRAM ARGS...``: how the launcher starts
    # each component with the same interpreter, installed or not.
    if len(sys.argv) < 2 or sys.argv[1] not in PROGRAMS:
        print(f"usage: python -m supervisors.cli {{{','.join(PROGRAMS)}}} ARGS...", file=sys.stderr)
        raise SystemExit(2)
    raise SystemExit(PROGRAMS[sys.argv[1]](sys.argv[2:]))
